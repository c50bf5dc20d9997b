//! Choosing an endpoint: power of two choices on outstanding connections,
//! among endpoints whose target port is healthy and that are not ejected.
//!
//! Outlier detection: an endpoint that fails `consecutive_failures`
//! connects in a row is ejected for `base_ejection × 2^(n-1)` (n = how many
//! times it has been ejected, capped at `max_ejection`); one success resets
//! its count. When every candidate is unhealthy or ejected, all of them are
//! tried anyway (Envoy's panic mode): a mesh that refuses everything
//! because of stale health is worse than one that tries.
//!
//! Pure: time is passed in as milliseconds, randomness as a function.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::mesh::EndpointState;

#[derive(Clone, Debug)]
pub struct OutlierSettings {
    pub consecutive_failures: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
}

impl Default for OutlierSettings {
    fn default() -> Self {
        OutlierSettings {
            consecutive_failures: 1,
            base_ejection: Duration::from_secs(5),
            max_ejection: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Default)]
struct Outlier {
    consecutive: u32,
    /// The ejection multiplier: ejections in a row, decaying by one for
    /// every `base_ejection` the endpoint then serves without one.
    ejections: u32,
    ejected_until_ms: u64,
    /// Since when the multiplier last decayed (or the last ejection ended).
    decayed_at_ms: u64,
}

/// Per endpoint and target port.
#[derive(Debug, Default)]
pub struct EndpointStats {
    pub outstanding: AtomicUsize,
    outlier: Mutex<Outlier>,
}

impl EndpointStats {
    pub fn is_ejected(&self, now_ms: u64) -> bool {
        self.outlier
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ejected_until_ms
            > now_ms
    }
}

/// Counts one outstanding connection until dropped.
pub struct Outstanding(Arc<EndpointStats>);

impl Drop for Outstanding {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Default)]
pub struct Balancer {
    settings: OutlierSettings,
    stats: Mutex<HashMap<(String, u16), Arc<EndpointStats>>>,
}

impl Balancer {
    pub fn new(settings: OutlierSettings) -> Balancer {
        Balancer {
            settings,
            stats: Mutex::new(HashMap::new()),
        }
    }

    pub fn stats(&self, host_id: &str, target: u16) -> Arc<EndpointStats> {
        let mut map = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        map.entry((host_id.to_string(), target))
            .or_default()
            .clone()
    }

    /// Picks an endpoint of `endpoints` for `target`, skipping `tried`.
    pub fn pick(
        &self,
        endpoints: &[Arc<EndpointState>],
        target: u16,
        tried: &[String],
        now_ms: u64,
        mut random: impl FnMut() -> u64,
    ) -> Option<(Arc<EndpointState>, Arc<EndpointStats>)> {
        let untried: Vec<&Arc<EndpointState>> = endpoints
            .iter()
            .filter(|e| !tried.iter().any(|t| t.as_str() == &*e.host_id))
            .collect();
        if untried.is_empty() {
            return None;
        }
        let with_stats: Vec<(&Arc<EndpointState>, Arc<EndpointStats>)> = untried
            .into_iter()
            .map(|e| (e, self.stats(&e.host_id, target)))
            .collect();
        let good: Vec<&(&Arc<EndpointState>, Arc<EndpointStats>)> = with_stats
            .iter()
            .filter(|(e, s)| e.is_healthy(target) && !s.is_ejected(now_ms))
            .collect();
        let pool: Vec<&(&Arc<EndpointState>, Arc<EndpointStats>)> = if good.is_empty() {
            with_stats.iter().collect()
        } else {
            good
        };
        let chosen = if pool.len() == 1 {
            pool[0]
        } else {
            let a = (random() % pool.len() as u64) as usize;
            let mut b = (random() % (pool.len() as u64 - 1)) as usize;
            if b >= a {
                b += 1;
            }
            let (ea, eb) = (pool[a], pool[b]);
            if eb.1.outstanding.load(Ordering::Relaxed) < ea.1.outstanding.load(Ordering::Relaxed) {
                eb
            } else {
                ea
            }
        };
        Some(((*chosen.0).clone(), chosen.1.clone()))
    }

    pub fn begin(stats: &Arc<EndpointStats>) -> Outstanding {
        stats.outstanding.fetch_add(1, Ordering::AcqRel);
        Outstanding(stats.clone())
    }

    /// A connection through the endpoint succeeded. Besides resetting the
    /// failure run, this lets the ejection multiplier decay (as Envoy's
    /// does): one step for every `base_ejection` of good service since the
    /// last ejection ended, so an endpoint that failed once long ago is not
    /// ejected for the maximum the next time.
    pub fn record_success(&self, stats: &EndpointStats, now_ms: u64) {
        let mut o = stats.outlier.lock().unwrap_or_else(|p| p.into_inner());
        o.consecutive = 0;
        if o.ejections == 0 || now_ms < o.ejected_until_ms {
            return;
        }
        let base = (self.settings.base_ejection.as_millis() as u64).max(1);
        let since = o.decayed_at_ms.max(o.ejected_until_ms);
        let steps = now_ms.saturating_sub(since) / base;
        if steps > 0 {
            o.ejections = o
                .ejections
                .saturating_sub(u32::try_from(steps).unwrap_or(u32::MAX));
            o.decayed_at_ms = since + steps * base;
        }
    }

    /// Returns true if this failure ejected the endpoint.
    pub fn record_failure(&self, stats: &EndpointStats, now_ms: u64) -> bool {
        let mut o = stats.outlier.lock().unwrap_or_else(|p| p.into_inner());
        o.consecutive += 1;
        if o.consecutive < self.settings.consecutive_failures || o.ejected_until_ms > now_ms {
            return false;
        }
        o.ejections = o.ejections.saturating_add(1);
        let factor = 1u64 << (o.ejections - 1).min(16);
        let ms = (self.settings.base_ejection.as_millis() as u64)
            .saturating_mul(factor)
            .min(self.settings.max_ejection.as_millis() as u64);
        o.ejected_until_ms = now_ms + ms;
        o.decayed_at_ms = o.ejected_until_ms;
        o.consecutive = 0;
        true
    }

    /// Forgets endpoints that left the mesh.
    pub fn retain(&self, live: impl Fn(&str) -> bool) {
        let mut map = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|(host, _), _| live(host));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::EndpointGroup;

    fn ep(host: &str, healthy: bool) -> Arc<EndpointState> {
        Arc::new(EndpointState {
            host_id: host.into(),
            address: "10.0.0.1".parse().unwrap(),
            tunnel_port: 15008,
            quic: false,
            group: Arc::new(EndpointGroup {
                identity: Arc::new("spiffe://td/ns/a/sa/b".parse().unwrap()),
                labels: Arc::from(Vec::new()),
                targets: Arc::from(vec![80u16]),
            }),
            healthy: u64::from(healthy),
        })
    }

    fn counter() -> impl FnMut() -> u64 {
        let mut n = 0u64;
        move || {
            n = n
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            n >> 33
        }
    }

    #[test]
    fn prefers_fewer_outstanding() {
        let b = Balancer::default();
        let eps = vec![ep("a", true), ep("b", true)];
        let busy = b.stats("a", 80);
        let _held: Vec<_> = (0..5).map(|_| Balancer::begin(&busy)).collect();
        for _ in 0..20 {
            let (e, _) = b.pick(&eps, 80, &[], 0, counter()).unwrap();
            assert_eq!(e.host_id.as_ref(), "b");
        }
    }

    #[test]
    fn skips_unhealthy_unless_all_are() {
        let b = Balancer::default();
        let eps = vec![ep("a", false), ep("b", true)];
        let mut rnd = counter();
        for _ in 0..20 {
            assert_eq!(
                b.pick(&eps, 80, &[], 0, &mut rnd)
                    .unwrap()
                    .0
                    .host_id
                    .as_ref(),
                "b"
            );
        }
        let sick = vec![ep("a", false)];
        assert_eq!(
            b.pick(&sick, 80, &[], 0, counter())
                .unwrap()
                .0
                .host_id
                .as_ref(),
            "a",
            "panic mode"
        );
        assert!(
            b.pick(&sick, 80, &["a".to_string()], 0, counter())
                .is_none()
        );
    }

    #[test]
    fn ejection_grows_and_expires() {
        let b = Balancer::new(OutlierSettings {
            consecutive_failures: 2,
            base_ejection: Duration::from_secs(5),
            max_ejection: Duration::from_secs(12),
        });
        let s = b.stats("a", 80);
        assert!(!b.record_failure(&s, 0));
        assert!(b.record_failure(&s, 0));
        assert!(s.is_ejected(4_999));
        assert!(!s.is_ejected(5_000));
        b.record_failure(&s, 6_000);
        assert!(b.record_failure(&s, 6_000), "second ejection");
        assert!(s.is_ejected(15_999), "10s the second time");
        b.record_failure(&s, 20_000);
        b.record_failure(&s, 20_000);
        assert!(
            s.is_ejected(31_999) && !s.is_ejected(32_000),
            "capped at 12s"
        );
        b.record_success(&s, 30_000);
        let eps = vec![ep("a", true), ep("b", true)];
        for _ in 0..10 {
            assert_eq!(
                b.pick(&eps, 80, &[], 30_000, counter())
                    .unwrap()
                    .0
                    .host_id
                    .as_ref(),
                "b"
            );
        }
    }

    #[test]
    fn the_ejection_multiplier_decays_with_good_service() {
        let b = Balancer::new(OutlierSettings {
            consecutive_failures: 1,
            base_ejection: Duration::from_secs(5),
            max_ejection: Duration::from_secs(300),
        });
        let s = b.stats("a", 80);
        // Three ejections in a row: 5 s, 10 s, 20 s.
        assert!(b.record_failure(&s, 0));
        assert!(b.record_failure(&s, 5_000));
        assert!(b.record_failure(&s, 15_000));
        assert!(s.is_ejected(34_999) && !s.is_ejected(35_000));
        // Serving well for two base periods after the last ejection ended
        // takes the multiplier from 3 to 1...
        b.record_success(&s, 35_000 + 10_000);
        // ...so the next ejection is 2 x 5 s, not 4 x 5 s.
        assert!(b.record_failure(&s, 50_000));
        assert!(s.is_ejected(59_999) && !s.is_ejected(60_000));
        // Long good service takes it back to the start.
        b.record_success(&s, 60_000 + 3_600_000);
        assert!(b.record_failure(&s, 4_000_000));
        assert!(!s.is_ejected(4_005_000), "5 s again");
    }
}
