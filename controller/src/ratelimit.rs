//! Limits failed join attempts per source address: at most `max_failures`
//! in any `window`; past that, every attempt from the address is refused
//! until the oldest failure leaves the window. A pure core: time is passed
//! in.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

/// Addresses tracked at once; past this the quietest are forgotten, so a
/// flood of spoofed-looking sources cannot grow memory without bound.
const MAX_TRACKED: usize = 65_536;

#[derive(Debug)]
pub struct FailureLimiter {
    max_failures: usize,
    window_ms: i64,
    failures: Mutex<HashMap<IpAddr, VecDeque<i64>>>,
}

impl FailureLimiter {
    pub fn new(max_failures: u32, window: Duration) -> FailureLimiter {
        FailureLimiter {
            max_failures: max_failures.max(1) as usize,
            window_ms: i64::try_from(window.as_millis()).unwrap_or(i64::MAX),
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Ok, or how long until `ip` may try again.
    pub fn check(&self, ip: IpAddr, now_ms: i64) -> Result<(), Duration> {
        let mut failures = match self.failures.lock() {
            Ok(f) => f,
            Err(p) => p.into_inner(),
        };
        let Some(times) = failures.get_mut(&ip) else {
            return Ok(());
        };
        while times.front().is_some_and(|t| *t <= now_ms - self.window_ms) {
            times.pop_front();
        }
        if times.len() >= self.max_failures {
            let oldest = times.front().copied().unwrap_or(now_ms);
            let wait = (oldest + self.window_ms - now_ms).max(1);
            return Err(Duration::from_millis(wait.unsigned_abs()));
        }
        Ok(())
    }

    pub fn record_failure(&self, ip: IpAddr, now_ms: i64) {
        let mut failures = match self.failures.lock() {
            Ok(f) => f,
            Err(p) => p.into_inner(),
        };
        if failures.len() >= MAX_TRACKED && !failures.contains_key(&ip) {
            let cutoff = now_ms - self.window_ms;
            failures.retain(|_, times| times.back().is_some_and(|t| *t > cutoff));
            if failures.len() >= MAX_TRACKED
                && let Some(victim) = failures.keys().next().copied()
            {
                failures.remove(&victim);
            }
        }
        let times = failures.entry(ip).or_default();
        times.push_back(now_ms);
        while times.len() > self.max_failures {
            times.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_max_failures_until_the_window_passes() {
        let l = FailureLimiter::new(3, Duration::from_secs(60));
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        let other: IpAddr = "10.0.0.10".parse().unwrap();
        for i in 0..3 {
            assert!(l.check(ip, i * 1000).is_ok());
            l.record_failure(ip, i * 1000);
        }
        let wait = l.check(ip, 3000).unwrap_err();
        assert_eq!(wait, Duration::from_millis(57_000));
        assert!(
            l.check(other, 3000).is_ok(),
            "other addresses are not affected"
        );
        assert!(
            l.check(ip, 60_001).is_ok(),
            "the oldest failure left the window"
        );
    }
}
