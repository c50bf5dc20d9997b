//! The answer cache for forwarded names.
//!
//! A pure data structure: the clock is passed in, so the tests move time
//! by hand. Entries live for the lowest TTL in the answer (positive
//! answers) or the SOA's negative TTL, `min(SOA TTL, SOA minimum)` (NXDOMAIN
//! and NODATA, RFC 2308), capped at `max_ttl`. Negative answers without an
//! SOA, truncated answers and any other response code are not cached.
//! Served records carry their remaining TTL, never more than the cap.
//!
//! The size is bounded: when full, expired entries go first, then the one
//! closest to expiry (which is what an LRU would mostly pick for DNS, at
//! O(log n) without bookkeeping on reads).

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Message, Query, ResponseCode},
    rr::{DNSClass, LowerName, RData, Record, RecordType},
};

/// What an answer depends on besides the name: DNSSEC records are only
/// present when the client set DO, and CD changes what a validating
/// upstream returns.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct CacheKey {
    name: LowerName,
    qtype: RecordType,
    qclass: DNSClass,
    dnssec_ok: bool,
    checking_disabled: bool,
}

impl CacheKey {
    pub(crate) fn new(query: &Query, dnssec_ok: bool, checking_disabled: bool) -> CacheKey {
        CacheKey {
            name: LowerName::new(query.name()),
            qtype: query.query_type(),
            qclass: query.query_class(),
            dnssec_ok,
            checking_disabled,
        }
    }
}

/// The parts of an upstream response that are relayed to clients.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Answer {
    pub(crate) response_code: ResponseCode,
    pub(crate) authentic_data: bool,
    pub(crate) truncated: bool,
    pub(crate) answers: Vec<Record>,
    pub(crate) authorities: Vec<Record>,
    pub(crate) additionals: Vec<Record>,
}

impl Answer {
    pub(crate) fn from_message(message: Message) -> Answer {
        Answer {
            response_code: message.metadata.response_code,
            authentic_data: message.metadata.authentic_data,
            truncated: message.metadata.truncation,
            answers: message.answers,
            authorities: message.authorities,
            additionals: message.additionals,
        }
    }

    fn records_mut(&mut self) -> impl Iterator<Item = &mut Record> {
        self.answers
            .iter_mut()
            .chain(self.authorities.iter_mut())
            .chain(self.additionals.iter_mut())
    }
}

/// How long `answer` may be cached, in seconds; `None`: not at all.
pub(crate) fn cache_ttl(answer: &Answer, max_ttl: u32) -> Option<u32> {
    if answer.truncated {
        return None;
    }
    let ttl = match answer.response_code {
        ResponseCode::NoError if !answer.answers.is_empty() => answer
            .answers
            .iter()
            .chain(&answer.authorities)
            .chain(&answer.additionals)
            .map(|r| r.ttl)
            .min()?,
        ResponseCode::NoError | ResponseCode::NXDomain => negative_ttl(&answer.authorities)?,
        _ => return None,
    };
    match ttl.min(max_ttl) {
        0 => None,
        ttl => Some(ttl),
    }
}

/// RFC 2308 §5: the negative TTL is the lower of the SOA's own TTL and its
/// MINIMUM field.
fn negative_ttl(authorities: &[Record]) -> Option<u32> {
    authorities.iter().find_map(|r| match &r.data {
        RData::SOA(soa) => Some(r.ttl.min(soa.minimum)),
        _ => None,
    })
}

#[derive(Debug)]
struct Entry {
    answer: Answer,
    stored: Instant,
    expires: Instant,
    seq: u64,
}

/// A bounded TTL cache of upstream answers.
#[derive(Debug)]
pub(crate) struct ResponseCache {
    capacity: usize,
    max_ttl: u32,
    entries: HashMap<CacheKey, Entry>,
    by_expiry: BTreeMap<(Instant, u64), CacheKey>,
    next_seq: u64,
}

impl ResponseCache {
    /// A cache of at most `capacity` answers (0 disables it), each kept at
    /// most `max_ttl` seconds.
    pub(crate) fn new(capacity: usize, max_ttl: u32) -> ResponseCache {
        ResponseCache {
            capacity,
            max_ttl,
            entries: HashMap::new(),
            by_expiry: BTreeMap::new(),
            next_seq: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// The cached answer for `key` with TTLs counted down to `now`.
    pub(crate) fn get(&mut self, key: &CacheKey, now: Instant) -> Option<Answer> {
        let entry = self.entries.get(key)?;
        if now >= entry.expires {
            self.remove(key);
            return None;
        }
        let elapsed = u32::try_from(now.saturating_duration_since(entry.stored).as_secs())
            .unwrap_or(u32::MAX);
        let mut answer = entry.answer.clone();
        for record in answer.records_mut() {
            record.ttl = record.ttl.min(self.max_ttl).saturating_sub(elapsed);
        }
        Some(answer)
    }

    /// Stores `answer` if it may be cached; returns whether it was.
    pub(crate) fn insert(&mut self, key: CacheKey, answer: Answer, now: Instant) -> bool {
        if self.capacity == 0 {
            return false;
        }
        let Some(ttl) = cache_ttl(&answer, self.max_ttl) else {
            return false;
        };
        self.remove(&key);
        while self.entries.len() >= self.capacity {
            // The earliest expiry is either already expired or the entry
            // with the least life left: the cheapest one to lose.
            let Some((_, victim)) = self.by_expiry.pop_first() else {
                break;
            };
            self.entries.remove(&victim);
        }
        let expires = now + Duration::from_secs(u64::from(ttl));
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        self.by_expiry.insert((expires, seq), key.clone());
        self.entries.insert(
            key,
            Entry {
                answer,
                stored: now,
                expires,
                seq,
            },
        );
        true
    }

    fn remove(&mut self, key: &CacheKey) {
        if let Some(entry) = self.entries.remove(key) {
            self.by_expiry.remove(&(entry.expires, entry.seq));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::{
        Name,
        rdata::{A, SOA},
    };

    fn key(name: &str) -> CacheKey {
        CacheKey::new(
            &Query::query(Name::from_ascii(name).unwrap(), RecordType::A),
            false,
            false,
        )
    }

    fn a(name: &str, ttl: u32) -> Record {
        Record::from_rdata(
            Name::from_ascii(name).unwrap(),
            ttl,
            RData::A(A::new(192, 0, 2, 1)),
        )
    }

    fn soa(ttl: u32, minimum: u32) -> Record {
        let zone = Name::from_ascii("example.").unwrap();
        Record::from_rdata(
            zone.clone(),
            ttl,
            RData::SOA(SOA::new(zone.clone(), zone, 1, 1, 1, 1, minimum)),
        )
    }

    fn answer(code: ResponseCode, answers: Vec<Record>, authorities: Vec<Record>) -> Answer {
        Answer {
            response_code: code,
            authentic_data: false,
            truncated: false,
            answers,
            authorities,
            additionals: Vec::new(),
        }
    }

    #[test]
    fn ttl_of_positive_answer_is_lowest_record_ttl_capped() {
        let ok = answer(
            ResponseCode::NoError,
            vec![a("x.", 60), a("x.", 40)],
            Vec::new(),
        );
        assert_eq!(cache_ttl(&ok, 300), Some(40));
        let long = answer(ResponseCode::NoError, vec![a("x.", 86400)], Vec::new());
        assert_eq!(cache_ttl(&long, 300), Some(300));
        let zero = answer(ResponseCode::NoError, vec![a("x.", 0)], Vec::new());
        assert_eq!(cache_ttl(&zero, 300), None);
    }

    #[test]
    fn negative_ttl_comes_from_the_soa() {
        let nx = answer(ResponseCode::NXDomain, Vec::new(), vec![soa(900, 60)]);
        assert_eq!(cache_ttl(&nx, 300), Some(60));
        let nodata = answer(ResponseCode::NoError, Vec::new(), vec![soa(20, 60)]);
        assert_eq!(cache_ttl(&nodata, 300), Some(20));
        let capped = answer(ResponseCode::NXDomain, Vec::new(), vec![soa(86400, 86400)]);
        assert_eq!(cache_ttl(&capped, 300), Some(300));
        // Without an SOA a negative answer is not cached (RFC 2308 §5).
        let bare = answer(ResponseCode::NXDomain, Vec::new(), Vec::new());
        assert_eq!(cache_ttl(&bare, 300), None);
    }

    #[test]
    fn failures_and_truncated_answers_are_not_cached() {
        assert_eq!(
            cache_ttl(
                &answer(ResponseCode::ServFail, Vec::new(), vec![soa(60, 60)]),
                300
            ),
            None
        );
        assert_eq!(
            cache_ttl(
                &answer(ResponseCode::Refused, vec![a("x.", 60)], Vec::new()),
                300
            ),
            None
        );
        let mut truncated = answer(ResponseCode::NoError, vec![a("x.", 60)], Vec::new());
        truncated.truncated = true;
        assert_eq!(cache_ttl(&truncated, 300), None);
    }

    #[test]
    fn hit_counts_ttl_down_and_expires() {
        let mut cache = ResponseCache::new(10, 300);
        let t0 = Instant::now();
        assert!(cache.insert(
            key("x."),
            answer(ResponseCode::NoError, vec![a("x.", 60)], Vec::new()),
            t0
        ));
        let hit = cache.get(&key("X."), t0 + Duration::from_secs(15)).unwrap();
        assert_eq!(hit.answers[0].ttl, 45);
        assert!(
            cache
                .get(&key("x."), t0 + Duration::from_secs(60))
                .is_none()
        );
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn served_ttls_never_exceed_the_cap() {
        let mut cache = ResponseCache::new(10, 300);
        let t0 = Instant::now();
        cache.insert(
            key("x."),
            answer(ResponseCode::NoError, vec![a("x.", 86400)], Vec::new()),
            t0,
        );
        let hit = cache
            .get(&key("x."), t0 + Duration::from_secs(100))
            .unwrap();
        assert_eq!(hit.answers[0].ttl, 200);
    }

    #[test]
    fn key_distinguishes_type_and_dnssec_ok() {
        let q = Query::query(Name::from_ascii("x.").unwrap(), RecordType::A);
        let aaaa = Query::query(Name::from_ascii("x.").unwrap(), RecordType::AAAA);
        assert_ne!(
            CacheKey::new(&q, false, false),
            CacheKey::new(&aaaa, false, false)
        );
        assert_ne!(
            CacheKey::new(&q, false, false),
            CacheKey::new(&q, true, false)
        );
        assert_ne!(
            CacheKey::new(&q, false, false),
            CacheKey::new(&q, false, true)
        );
    }

    #[test]
    fn size_is_bounded_evicting_expired_then_soonest_to_expire() {
        let mut cache = ResponseCache::new(2, 300);
        let t0 = Instant::now();
        let ok = |ttl| answer(ResponseCode::NoError, vec![a("x.", ttl)], Vec::new());
        cache.insert(key("short."), ok(10), t0);
        cache.insert(key("long."), ok(100), t0);
        cache.insert(key("new."), ok(50), t0 + Duration::from_secs(1));
        assert_eq!(cache.len(), 2);
        let later = t0 + Duration::from_secs(2);
        assert!(cache.get(&key("short."), later).is_none());
        assert!(cache.get(&key("long."), later).is_some());
        assert!(cache.get(&key("new."), later).is_some());
        // Replacing an entry does not grow the cache.
        cache.insert(key("new."), ok(70), later);
        assert_eq!(cache.len(), 2);
        assert!(cache.get(&key("long."), later).is_some());
    }

    #[test]
    fn zero_capacity_disables_caching() {
        let mut cache = ResponseCache::new(0, 300);
        let t0 = Instant::now();
        assert!(!cache.insert(
            key("x."),
            answer(ResponseCode::NoError, vec![a("x.", 60)], Vec::new()),
            t0
        ));
        assert!(cache.get(&key("x."), t0).is_none());
    }
}
