//! Time as a dependency: everything that decides by the clock (certificate
//! renewal, token expiry, rate limits, CA root retirement) takes a
//! [`Clock`], so tests drive time instead of sleeping.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> SystemTime;

    fn now_unix(&self) -> i64 {
        unix_seconds(self.now())
    }
}

pub type SharedClock = Arc<dyn Clock>;

pub fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

pub fn from_unix_seconds(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

/// The real clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

pub fn system() -> SharedClock {
    Arc::new(SystemClock)
}

/// A clock tests move by hand.
#[derive(Debug)]
pub struct ManualClock {
    millis: AtomicI64,
}

impl ManualClock {
    pub fn new(start: SystemTime) -> Arc<ManualClock> {
        let millis = match start.duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
            Err(_) => 0,
        };
        Arc::new(ManualClock {
            millis: AtomicI64::new(millis),
        })
    }

    pub fn advance(&self, by: Duration) {
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.millis.fetch_add(ms, Ordering::SeqCst);
    }

    pub fn set(&self, to: SystemTime) {
        if let Ok(d) = to.duration_since(UNIX_EPOCH) {
            self.millis.store(
                i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
                Ordering::SeqCst,
            );
        }
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        let ms = self.millis.load(Ordering::SeqCst);
        UNIX_EPOCH + Duration::from_millis(ms.max(0).unsigned_abs())
    }
}

/// RFC 3339 text of a unix time, UTC, seconds precision.
pub fn rfc3339(unix: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(unix) {
        Ok(t) => t
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| unix.to_string()),
        Err(_) => unix.to_string(),
    }
}
