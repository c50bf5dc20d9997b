//! Choosing a backend from the controller's `--store` flag.
//!
//! | `--store` | backend |
//! |---|---|
//! | `embedded:PATH` | [`EmbeddedStore`] in the redb file at PATH |
//! | `etcd://HOST:PORT[,HOST:PORT...]` | [`EtcdStore`], plain HTTP |
//! | `etcds://HOST:PORT[,HOST:PORT...]` | [`EtcdStore`] over TLS; the CA and client certificate come from [`EtcdTls`], not from the URL |
//! | `consul://HOST:PORT[,...]` | parsed, but not built in this release |
//!
//! Credentials and TLS files stay out of the URL so that the flag can be
//! logged and shown on the admin port as it is.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use crate::embedded::EmbeddedStore;
use crate::etcd::{EtcdConfig, EtcdCredentials, EtcdStore, EtcdTls};
use crate::{Result, SharedStore, StoreError};

/// A parsed `--store` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUrl {
    /// `embedded:PATH` (also `embedded://PATH`).
    Embedded(PathBuf),
    /// `etcd://` (plain) or `etcds://` (TLS) with `host:port` endpoints.
    Etcd { endpoints: Vec<String>, tls: bool },
    /// `consul://`; recognized so that the error can say what is missing.
    Consul { endpoints: Vec<String> },
}

/// Why a `--store` value was refused; the message quotes the value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("--store {input:?}: {reason}")]
pub struct StoreUrlError {
    pub input: String,
    pub reason: String,
}

const EXPECTED: &str = "expected embedded:PATH, etcd://HOST:PORT[,HOST:PORT...], \
                        etcds://HOST:PORT[,HOST:PORT...] or consul://HOST:PORT";

impl FromStr for StoreUrl {
    type Err = StoreUrlError;

    fn from_str(input: &str) -> Result<StoreUrl, StoreUrlError> {
        let fail = |reason: String| StoreUrlError {
            input: input.to_string(),
            reason,
        };
        let s = input.trim();
        if let Some(path) = s.strip_prefix("embedded:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err(fail("no path; expected embedded:PATH".to_string()));
            }
            return Ok(StoreUrl::Embedded(PathBuf::from(path)));
        }
        let Some((scheme, rest)) = s.split_once("://") else {
            return Err(fail(format!("no scheme; {EXPECTED}")));
        };
        let (tls, shape) = match scheme {
            "etcd" => (false, "etcd://HOST:PORT[,HOST:PORT...]"),
            "etcds" => (true, "etcds://HOST:PORT[,HOST:PORT...]"),
            "consul" => (false, "consul://HOST:PORT[,HOST:PORT...]"),
            other => return Err(fail(format!("unknown scheme {other:?}; {EXPECTED}"))),
        };
        let endpoints =
            parse_endpoints(rest).map_err(|reason| fail(format!("{reason}; expected {shape}")))?;
        Ok(match scheme {
            "consul" => StoreUrl::Consul { endpoints },
            _ => StoreUrl::Etcd { endpoints, tls },
        })
    }
}

fn parse_endpoints(list: &str) -> std::result::Result<Vec<String>, String> {
    let list = list.strip_suffix('/').unwrap_or(list);
    if list.is_empty() {
        return Err("no endpoints".to_string());
    }
    list.split(',')
        .enumerate()
        .map(|(i, endpoint)| parse_endpoint(endpoint.trim(), i + 1))
        .collect()
}

fn parse_endpoint(endpoint: &str, position: usize) -> std::result::Result<String, String> {
    if endpoint.is_empty() {
        return Err(format!("endpoint {position} is empty"));
    }
    if endpoint.contains('/') || endpoint.contains('@') || endpoint.contains('?') {
        return Err(format!(
            "endpoint {endpoint:?} is not HOST:PORT (paths, users and options do not belong in --store)"
        ));
    }
    let (host, port) = if let Some(bracketed) = endpoint.strip_prefix('[') {
        // [IPv6]:PORT
        let Some((host, rest)) = bracketed.split_once(']') else {
            return Err(format!("endpoint {endpoint:?} has no closing ']'"));
        };
        let Some(port) = rest.strip_prefix(':') else {
            return Err(format!("endpoint {endpoint:?} has no port"));
        };
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!(
                "endpoint {endpoint:?}: {host:?} is not an IPv6 address"
            ));
        }
        (host, port)
    } else {
        let Some((host, port)) = endpoint.rsplit_once(':') else {
            return Err(format!("endpoint {endpoint:?} has no port"));
        };
        if host.contains(':') {
            return Err(format!(
                "endpoint {endpoint:?}: write an IPv6 address in brackets, as [ADDR]:PORT"
            ));
        }
        (host, port)
    };
    if host.is_empty() {
        return Err(format!("endpoint {endpoint:?} has no host"));
    }
    if host.chars().any(char::is_whitespace) {
        return Err(format!(
            "endpoint {endpoint:?}: the host contains whitespace"
        ));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(endpoint.to_string()),
        _ => Err(format!(
            "endpoint {endpoint:?} has an invalid port {port:?} (1-65535)"
        )),
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::Embedded(path) => write!(f, "embedded:{}", path.display()),
            StoreUrl::Etcd { endpoints, tls } => {
                let scheme = if *tls { "etcds" } else { "etcd" };
                write!(f, "{scheme}://{}", endpoints.join(","))
            }
            StoreUrl::Consul { endpoints } => write!(f, "consul://{}", endpoints.join(",")),
        }
    }
}

/// Opens the store `url` names. `etcd_tls` is required for `etcds://` and
/// refused for `etcd://` (so that a configured CA never silently goes
/// unused); `credentials` are used for etcd only.
pub async fn open_store(
    url: &StoreUrl,
    etcd_tls: Option<EtcdTls>,
    credentials: Option<EtcdCredentials>,
) -> Result<SharedStore> {
    match url {
        StoreUrl::Embedded(path) => {
            if etcd_tls.is_some() || credentials.is_some() {
                tracing::warn!(store = %url, "etcd TLS settings and credentials are ignored by the embedded store");
            }
            Ok(Arc::new(EmbeddedStore::open(path)?))
        }
        StoreUrl::Etcd { endpoints, tls } => {
            match (tls, &etcd_tls) {
                (true, None) => {
                    return Err(StoreError::Invalid(format!(
                        "--store {url}: etcds:// needs TLS settings (at least the CA file that signed the etcd members' certificates)"
                    )));
                }
                (false, Some(_)) => {
                    return Err(StoreError::Invalid(format!(
                        "--store {url}: etcd TLS files are configured but the URL is plain etcd://; use etcds://"
                    )));
                }
                _ => {}
            }
            let mut config = EtcdConfig::new(endpoints.iter().cloned());
            config.tls = etcd_tls;
            if let Some(credentials) = credentials {
                config.username = Some(credentials.username);
                config.password = Some(credentials.password);
            }
            Ok(Arc::new(EtcdStore::connect(config).await?))
        }
        StoreUrl::Consul { .. } => Err(StoreError::Invalid(format!(
            "--store {url}: the Consul backend is not built in this release; use etcd://, etcds:// or embedded:"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<StoreUrl, StoreUrlError> {
        s.parse()
    }

    #[test]
    fn parses_every_backend() {
        assert_eq!(
            parse("embedded:/var/lib/hostmesh/store.redb").unwrap(),
            StoreUrl::Embedded("/var/lib/hostmesh/store.redb".into())
        );
        assert_eq!(
            parse("embedded:///var/lib/x.redb").unwrap(),
            StoreUrl::Embedded("/var/lib/x.redb".into())
        );
        assert_eq!(
            parse("etcd://10.0.0.1:2379,10.0.0.2:2379").unwrap(),
            StoreUrl::Etcd {
                endpoints: vec!["10.0.0.1:2379".into(), "10.0.0.2:2379".into()],
                tls: false
            }
        );
        assert_eq!(
            parse("etcds://etcd.example:2379/").unwrap(),
            StoreUrl::Etcd {
                endpoints: vec!["etcd.example:2379".into()],
                tls: true
            }
        );
        assert_eq!(
            parse("etcd://[::1]:2379").unwrap(),
            StoreUrl::Etcd {
                endpoints: vec!["[::1]:2379".into()],
                tls: false
            }
        );
        assert_eq!(
            parse("consul://c:8500").unwrap(),
            StoreUrl::Consul {
                endpoints: vec!["c:8500".into()]
            }
        );
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "embedded:/tmp/x.redb",
            "etcd://a:1,b:2",
            "etcds://a:2379",
            "consul://c:8500",
            "etcd://[::1]:2379",
        ] {
            let url = parse(s).unwrap();
            assert_eq!(url.to_string(), s);
            assert_eq!(parse(&url.to_string()).unwrap(), url);
        }
    }

    #[test]
    fn errors_name_the_bad_part() {
        let cases = [
            (
                "etcd://",
                r#"--store "etcd://": no endpoints; expected etcd://HOST:PORT[,HOST:PORT...]"#,
            ),
            (
                "embedded:",
                r#"--store "embedded:": no path; expected embedded:PATH"#,
            ),
            ("etcd://h", r#"endpoint "h" has no port"#),
            ("etcd://h:x", r#"endpoint "h:x" has an invalid port "x""#),
            ("etcd://h:0", r#"invalid port "0""#),
            ("etcd://a:1,,b:2", "endpoint 2 is empty"),
            ("etcd://:2379", r#"endpoint ":2379" has no host"#),
            ("etcd://::1:2379", "IPv6 address in brackets"),
            ("etcd://h:1/path", "not HOST:PORT"),
            ("redis://h:1", r#"unknown scheme "redis""#),
            ("/var/lib/x", "no scheme"),
        ];
        for (input, expected) in cases {
            let err = parse(input).unwrap_err().to_string();
            assert!(err.contains(expected), "{input}: {err}");
            assert!(err.contains(&format!("{input:?}")), "{input}: {err}");
        }
    }

    #[tokio::test]
    async fn consul_parses_but_does_not_open() {
        let url = parse("consul://c:8500").unwrap();
        let err = open_store(&url, None, None).await.unwrap_err().to_string();
        assert!(err.contains("Consul backend is not built"), "{err}");
    }

    #[tokio::test]
    async fn tls_settings_must_match_the_scheme() {
        let tls = EtcdTls {
            ca_file: "/nonexistent/ca.pem".into(),
            cert_file: None,
            key_file: None,
        };
        let plain = parse("etcd://127.0.0.1:1").unwrap();
        let err = open_store(&plain, Some(tls), None).await.unwrap_err();
        assert!(err.to_string().contains("use etcds://"), "{err}");
        let secure = parse("etcds://127.0.0.1:1").unwrap();
        let err = open_store(&secure, None, None).await.unwrap_err();
        assert!(err.to_string().contains("needs TLS settings"), "{err}");
    }
}
