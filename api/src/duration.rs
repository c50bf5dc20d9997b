//! A duration written the way operators write them in YAML and TOML:
//! `2s`, `500ms`, `1h30m`. Serialized back in the same form, so that
//! `meshctl get -o yaml` output can be applied again unchanged.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    pub fn from_secs(secs: u64) -> Duration {
        Duration(std::time::Duration::from_secs(secs))
    }

    pub fn from_millis(ms: u64) -> Duration {
        Duration(std::time::Duration::from_millis(ms))
    }

    pub fn get(self) -> std::time::Duration {
        self.0
    }
}

impl From<std::time::Duration> for Duration {
    fn from(d: std::time::Duration) -> Duration {
        Duration(d)
    }
}

impl FromStr for Duration {
    type Err = String;

    fn from_str(s: &str) -> Result<Duration, String> {
        let trimmed = s.trim();
        if trimmed.is_empty() {
            return Err("empty duration".to_string());
        }
        humantime::parse_duration(trimmed)
            .map(Duration)
            .map_err(|e| format!("{trimmed:?} is not a duration like 2s, 500ms or 1h: {e}"))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_zero() {
            return f.write_str("0s");
        }
        // humantime writes "1s 500ms"; compact it to "1s500ms", which it
        // also parses, so the text stays one YAML scalar without quotes.
        let text = humantime::format_duration(self.0).to_string();
        f.write_str(&text.replace(' ', ""))
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Duration;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as 2s, 500ms or 1h")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Duration, E> {
                v.parse().map_err(E::custom)
            }

            fn visit_u64<E: serde::de::Error>(self, _v: u64) -> Result<Duration, E> {
                Err(E::custom(
                    "a bare number is ambiguous; write the unit, e.g. 2s or 500ms",
                ))
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Duration, E> {
                self.visit_u64(v.unsigned_abs())
            }

            fn visit_f64<E: serde::de::Error>(self, _v: f64) -> Result<Duration, E> {
                self.visit_u64(0)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_compact_forms() {
        for (text, ms) in [
            ("2s", 2000),
            ("500ms", 500),
            ("1m30s", 90_000),
            ("1h", 3_600_000),
        ] {
            let d: Duration = text.parse().unwrap();
            assert_eq!(d.0.as_millis(), ms, "{text}");
            assert_eq!(d.to_string().parse::<Duration>().unwrap(), d);
        }
        assert_eq!(Duration::from_millis(1500).to_string(), "1s500ms");
    }

    #[test]
    fn rejects_bare_numbers_and_garbage() {
        assert!(serde_json::from_str::<Duration>("5").is_err());
        let err = "soon".parse::<Duration>().unwrap_err();
        assert!(err.contains("\"soon\""), "{err}");
    }
}
