//! The decision core: one query's bytes in, the response's bytes out.
//!
//! [`Responder::respond`] knows nothing about sockets; the server loops
//! call it for every datagram and every TCP frame. It validates the query,
//! answers mesh names from the current [`MeshIndex`], serves forwarded
//! names from the cache or the upstreams, and encodes the response within
//! the size the client can take (the EDNS payload it advertised, 512 bytes
//! without EDNS, 65535 over TCP). A response that does not fit is sent as
//! header, question and OPT with the TC bit, and the client retries over
//! TCP (RFC 2181 §9, RFC 7766).

use std::{
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::Instant,
};

use arc_swap::ArcSwapOption;
use hickory_proto::{
    op::{Edns, Message, Metadata, OpCode, Query, ResponseCode},
    rr::{RData, Record, rdata::A, rdata::AAAA},
};
use tokio::sync::watch;

use super::{
    DnsMetrics, NameTable,
    cache::{Answer, CacheKey, ResponseCache},
    metrics::QueryResult,
    names::{MeshIndex, MeshLookup},
    upstream::Upstreams,
};

/// The EDNS payload size we advertise to clients: what we accept in a
/// query, and the common safe size (DNS Flag Day 2020).
const CLIENT_PAYLOAD: u16 = 1232;
/// The longest cache lifetime of a forwarded answer, in seconds.
pub(crate) const MAX_CACHE_TTL: u32 = 300;

/// How the query arrived; decides how large the response may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Transport {
    Udp,
    Tcp,
}

/// The index built from one table, kept until the table changes.
struct IndexSnapshot {
    table: Arc<NameTable>,
    index: MeshIndex,
}

pub(crate) struct Responder {
    names: watch::Receiver<Arc<NameTable>>,
    index: ArcSwapOption<IndexSnapshot>,
    mesh_ttl: u32,
    upstreams: Upstreams,
    cache: Mutex<ResponseCache>,
    metrics: DnsMetrics,
}

impl Responder {
    pub(crate) fn new(
        names: watch::Receiver<Arc<NameTable>>,
        mesh_ttl: u32,
        upstreams: Upstreams,
        cache_entries: usize,
        metrics: DnsMetrics,
    ) -> Responder {
        Responder {
            names,
            index: ArcSwapOption::empty(),
            mesh_ttl,
            upstreams,
            cache: Mutex::new(ResponseCache::new(cache_entries, MAX_CACHE_TTL)),
            metrics,
        }
    }

    /// The response to `packet`, or `None` when nothing should be sent
    /// (too short to carry an ID, or not a query).
    pub(crate) async fn respond(&self, packet: &[u8], transport: Transport) -> Option<Vec<u8>> {
        // A message with QR set is a response: answering could start a
        // loop between two servers, so it is dropped.
        if packet.len() < 12 || packet[2] & 0x80 != 0 {
            tracing::debug!(
                len = packet.len(),
                "dropping a packet that is not a DNS query"
            );
            self.metrics.query(QueryResult::Dropped);
            return None;
        }
        let request = match Message::from_vec(packet) {
            Ok(request) => request,
            Err(error) => {
                tracing::debug!(%error, "undecodable DNS query");
                self.metrics.query(QueryResult::FormErr);
                return Some(raw_formerr(packet));
            }
        };
        let (response, result) = self.answer(&request).await;
        self.metrics.query(result);
        Some(encode(&response, request.edns.as_ref(), transport))
    }

    async fn answer(&self, request: &Message) -> (Message, QueryResult) {
        if request.metadata.op_code != OpCode::Query {
            return (
                error_response(request, ResponseCode::NotImp),
                QueryResult::NotImp,
            );
        }
        let [query] = request.queries.as_slice() else {
            return (
                error_response(request, ResponseCode::FormErr),
                QueryResult::FormErr,
            );
        };
        if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
            // RFC 6891 §6.1.3: we only speak EDNS version 0.
            return (
                error_response(request, ResponseCode::BADVERS),
                QueryResult::FormErr,
            );
        }

        let snapshot = self.index();
        let lookup = snapshot
            .index
            .lookup(query.name(), query.query_type(), query.query_class());
        let mut response = response_to(request);
        let result = match lookup {
            MeshLookup::Forward => return self.forward(request, query).await,
            MeshLookup::NotLoaded => {
                response.metadata.response_code = ResponseCode::ServFail;
                QueryResult::ServFail
            }
            MeshLookup::Refused => {
                response.metadata.response_code = ResponseCode::Refused;
                QueryResult::Refused
            }
            MeshLookup::Addresses(vips) => {
                response.metadata.authoritative = true;
                response.answers = vips
                    .into_iter()
                    .map(|vip| {
                        let data = match vip {
                            IpAddr::V4(v4) => RData::A(A(v4)),
                            IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
                        };
                        Record::from_rdata(query.name().clone(), self.mesh_ttl, data)
                    })
                    .collect();
                QueryResult::MeshAnswer
            }
            MeshLookup::ApexSoa => {
                response.metadata.authoritative = true;
                response.answers.push(snapshot.index.soa(self.mesh_ttl));
                QueryResult::MeshAnswer
            }
            MeshLookup::NoData => {
                response.metadata.authoritative = true;
                response.authorities.push(snapshot.index.soa(self.mesh_ttl));
                QueryResult::MeshNoData
            }
            MeshLookup::NxDomain => {
                response.metadata.authoritative = true;
                response.metadata.response_code = ResponseCode::NXDomain;
                response.authorities.push(snapshot.index.soa(self.mesh_ttl));
                QueryResult::MeshNxDomain
            }
        };
        // Our own data: nothing was validated, nothing to skip validating.
        response.metadata.checking_disabled = false;
        (response, result)
    }

    async fn forward(&self, request: &Message, query: &Query) -> (Message, QueryResult) {
        let dnssec_ok = request.edns.as_ref().is_some_and(|e| e.flags().dnssec_ok);
        let checking_disabled = request.metadata.checking_disabled;
        let key = CacheKey::new(query, dnssec_ok, checking_disabled);

        if let Some(answer) = self.cache().get(&key, Instant::now()) {
            return (relay(request, answer, dnssec_ok), QueryResult::CacheHit);
        }
        match self
            .upstreams
            .resolve(query, checking_disabled, dnssec_ok)
            .await
        {
            Ok(message) => {
                let answer = Answer::from_message(message);
                {
                    let mut cache = self.cache();
                    cache.insert(key, answer.clone(), Instant::now());
                    self.metrics.set_cache_entries(cache.len());
                }
                (relay(request, answer, dnssec_ok), QueryResult::Forwarded)
            }
            Err(error) => {
                tracing::debug!(%error, question = %query, "no upstream answered");
                let mut response = response_to(request);
                response.metadata.response_code = ResponseCode::ServFail;
                (response, QueryResult::ServFail)
            }
        }
    }

    /// The index for the current table, rebuilt only when the table changed.
    fn index(&self) -> Arc<IndexSnapshot> {
        let table = self.names.borrow().clone();
        if let Some(snapshot) = self.index.load_full()
            && Arc::ptr_eq(&snapshot.table, &table)
        {
            return snapshot;
        }
        let snapshot = Arc::new(IndexSnapshot {
            index: MeshIndex::new(&table),
            table,
        });
        self.index.store(Some(snapshot.clone()));
        snapshot
    }

    fn cache(&self) -> MutexGuard<'_, ResponseCache> {
        // The cache holds no invariant a panic could break halfway.
        self.cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A response skeleton: same ID, opcode, RD and CD, the question echoed as
/// sent (case included), RA set, and an OPT if the query had one.
fn response_to(request: &Message) -> Message {
    let mut response = Message::response(request.metadata.id, request.metadata.op_code);
    response.metadata = Metadata::response_from_request(&request.metadata);
    response.metadata.recursion_available = true;
    response.queries = request.queries.clone();
    if let Some(edns) = &request.edns {
        let mut ours = Edns::new();
        ours.set_max_payload(CLIENT_PAYLOAD)
            .set_dnssec_ok(edns.flags().dnssec_ok);
        response.edns = Some(ours);
    }
    response
}

fn error_response(request: &Message, code: ResponseCode) -> Message {
    let mut response = response_to(request);
    response.metadata.response_code = code;
    if code == ResponseCode::BADVERS {
        // The extended code travels in the OPT record, which must be there.
        let mut edns = Edns::new();
        edns.set_max_payload(CLIENT_PAYLOAD);
        response.edns = Some(edns);
    }
    response
}

/// An upstream (or cached) answer relayed to the client.
fn relay(request: &Message, answer: Answer, dnssec_ok: bool) -> Message {
    let mut response = response_to(request);
    response.metadata.response_code = answer.response_code;
    // AD is meaningful only to a client that asked for DNSSEC (DO or AD).
    response.metadata.authentic_data =
        answer.authentic_data && (dnssec_ok || request.metadata.authentic_data);
    response.answers = answer.answers;
    response.authorities = answer.authorities;
    response.additionals = answer.additionals;
    response
}

/// Encodes `response` to fit what the client can receive.
pub(crate) fn encode(
    response: &Message,
    request_edns: Option<&Edns>,
    transport: Transport,
) -> Vec<u8> {
    let limit = match transport {
        Transport::Udp => usize::from(request_edns.map_or(512, |e| e.max_payload().max(512))),
        Transport::Tcp => usize::from(u16::MAX),
    };
    let encoded = response.to_vec().and_then(|bytes| {
        if bytes.len() <= limit {
            Ok(bytes)
        } else {
            response.truncate().to_vec()
        }
    });
    match encoded {
        Ok(bytes) => bytes,
        Err(error) => {
            tracing::warn!(
                %error,
                id = response.metadata.id,
                "encoding a DNS response failed; sending SERVFAIL"
            );
            let mut failure = Message::error_msg(
                response.metadata.id,
                response.metadata.op_code,
                ResponseCode::ServFail,
            );
            failure.metadata.recursion_desired = response.metadata.recursion_desired;
            failure.metadata.recursion_available = true;
            failure
                .to_vec()
                .unwrap_or_else(|_| raw_header(response.metadata.id, 0, ResponseCode::ServFail))
        }
    }
}

/// FORMERR for a query we could not decode: its ID, opcode and RD echoed,
/// no sections (RFC 1035 §4.1.1).
fn raw_formerr(packet: &[u8]) -> Vec<u8> {
    let (id, flags) = match packet {
        [high, low, flags, ..] => (u16::from_be_bytes([*high, *low]), *flags),
        _ => (0, 0),
    };
    raw_header(id, flags, ResponseCode::FormErr)
}

/// A bare 12-byte response header; `flags` are opcode and RD bits of byte 2.
fn raw_header(id: u16, flags: u8, code: ResponseCode) -> Vec<u8> {
    let id = id.to_be_bytes();
    // QR, opcode, RD | RA, rcode (low four bits).
    vec![
        id[0],
        id[1],
        0x80 | (flags & 0x79),
        0x80 | (code.low() & 0x0f),
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{collections::HashMap, time::Duration};

    use hickory_proto::{
        op::MessageType,
        rr::{Name, RecordType, rdata::TXT},
    };
    use prometheus_client::registry::Registry;

    fn responder(table: NameTable) -> (Responder, watch::Sender<Arc<NameTable>>, DnsMetrics) {
        let metrics = DnsMetrics::new(&mut Registry::default());
        let (tx, rx) = watch::channel(Arc::new(table));
        let upstreams = Upstreams::new(
            Vec::new(),
            None,
            Duration::from_millis(100),
            metrics.clone(),
        );
        (
            Responder::new(rx, 30, upstreams, 16, metrics.clone()),
            tx,
            metrics,
        )
    }

    fn table() -> NameTable {
        let mut services = HashMap::new();
        services.insert(
            ("web".into(), "shop".into()),
            vec!["240.240.0.10".parse().unwrap()],
        );
        NameTable {
            loaded: true,
            domain: "mesh".into(),
            own_namespace: "shop".into(),
            services,
        }
    }

    fn query(name: &str, qtype: RecordType) -> Message {
        let mut m = Message::query();
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        m
    }

    async fn ask(r: &Responder, q: &Message) -> Message {
        let bytes = r
            .respond(&q.to_vec().unwrap(), Transport::Udp)
            .await
            .unwrap();
        Message::from_vec(&bytes).unwrap()
    }

    #[tokio::test]
    async fn mesh_answer_echoes_question_case_and_sets_aa() {
        let (r, _tx, metrics) = responder(table());
        let q = query("Web.Shop.Mesh.", RecordType::A);
        let resp = ask(&r, &q).await;
        assert_eq!(resp.metadata.id, q.metadata.id);
        assert_eq!(resp.metadata.message_type, MessageType::Response);
        assert!(
            resp.metadata.authoritative
                && resp.metadata.recursion_available
                && resp.metadata.recursion_desired
        );
        assert_eq!(resp.queries[0].name().to_ascii(), "Web.Shop.Mesh.");
        assert_eq!(resp.answers.len(), 1);
        assert_eq!(resp.answers[0].ttl, 30);
        assert!(
            resp.answers[0]
                .name
                .eq_case(&Name::from_ascii("Web.Shop.Mesh.").unwrap())
        );
        assert_eq!(metrics.query_count(QueryResult::MeshAnswer), 1);
    }

    #[tokio::test]
    async fn table_changes_apply_to_the_next_query() {
        let (r, tx, _) = responder(NameTable::default());
        let q = query("web.shop.mesh.", RecordType::A);
        assert_eq!(
            ask(&r, &q).await.metadata.response_code,
            ResponseCode::ServFail
        );
        tx.send(Arc::new(table())).unwrap();
        let resp = ask(&r, &q).await;
        assert_eq!(resp.metadata.response_code, ResponseCode::NoError);
        assert_eq!(resp.answers.len(), 1);
    }

    #[tokio::test]
    async fn without_upstreams_other_names_get_servfail() {
        let (r, _tx, metrics) = responder(table());
        let resp = ask(&r, &query("example.com.", RecordType::A)).await;
        assert_eq!(resp.metadata.response_code, ResponseCode::ServFail);
        assert!(!resp.metadata.authoritative);
        assert_eq!(metrics.query_count(QueryResult::ServFail), 1);
    }

    #[tokio::test]
    async fn several_questions_get_formerr_and_other_opcodes_notimp() {
        let (r, _tx, _) = responder(table());
        let mut two = query("web.shop.mesh.", RecordType::A);
        two.add_query(Query::query(Name::from_ascii("x.").unwrap(), RecordType::A));
        assert_eq!(
            ask(&r, &two).await.metadata.response_code,
            ResponseCode::FormErr
        );

        let mut none = query("web.shop.mesh.", RecordType::A);
        none.queries.clear();
        assert_eq!(
            ask(&r, &none).await.metadata.response_code,
            ResponseCode::FormErr
        );

        let mut notify = query("web.shop.mesh.", RecordType::SOA);
        notify.metadata.op_code = OpCode::Notify;
        assert_eq!(
            ask(&r, &notify).await.metadata.response_code,
            ResponseCode::NotImp
        );
    }

    #[tokio::test]
    async fn unknown_edns_version_gets_badvers() {
        let (r, _tx, _) = responder(table());
        let mut q = query("web.shop.mesh.", RecordType::A);
        let mut edns = Edns::new();
        edns.set_version(1);
        q.set_edns(edns);
        let resp = ask(&r, &q).await;
        // 16 is both BADVERS and BADSIG (RFC 6891); hickory decodes it as the latter.
        assert_eq!(u16::from(resp.metadata.response_code), 16);
        assert_eq!(resp.edns.map(|e| e.version()), Some(0));
    }

    #[tokio::test]
    async fn garbage_gets_formerr_or_nothing() {
        let (r, _tx, metrics) = responder(table());
        assert_eq!(r.respond(b"", Transport::Udp).await, None);
        assert_eq!(r.respond(b"\x12\x34\x01", Transport::Udp).await, None);
        // QR set: a response, never answered.
        let mut response = query("web.shop.mesh.", RecordType::A);
        response.metadata.message_type = MessageType::Response;
        assert_eq!(
            r.respond(&response.to_vec().unwrap(), Transport::Udp).await,
            None
        );
        // A header announcing a question that is not there.
        let packet = [
            0xab, 0xcd, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0x03, b'w',
        ];
        let reply = r.respond(&packet, Transport::Udp).await.unwrap();
        let resp = Message::from_vec(&reply).unwrap();
        assert_eq!(resp.metadata.id, 0xabcd);
        assert_eq!(resp.metadata.response_code, ResponseCode::FormErr);
        assert!(resp.metadata.recursion_desired);
        assert_eq!(metrics.query_count(QueryResult::FormErr), 1);
        assert_eq!(metrics.query_count(QueryResult::Dropped), 3);
    }

    #[test]
    fn oversized_udp_responses_are_truncated_to_the_client_size() {
        let q = query("big.example.", RecordType::TXT);
        let mut resp = response_to(&q);
        for i in 0..40 {
            resp.answers.push(Record::from_rdata(
                Name::from_ascii("big.example.").unwrap(),
                60,
                RData::TXT(TXT::new(vec![format!("{i:03}{}", "x".repeat(60))])),
            ));
        }
        let full = encode(&resp, None, Transport::Tcp);
        assert!(full.len() > 1232);
        assert_eq!(Message::from_vec(&full).unwrap().answers.len(), 40);

        let plain = encode(&resp, None, Transport::Udp);
        assert!(plain.len() <= 512);
        let plain = Message::from_vec(&plain).unwrap();
        assert!(plain.metadata.truncation);
        assert!(plain.answers.is_empty());
        assert_eq!(plain.queries, q.queries);

        let mut big = Edns::new();
        big.set_max_payload(4096);
        let fits = Message::from_vec(&encode(&resp, Some(&big), Transport::Udp)).unwrap();
        assert!(!fits.metadata.truncation);
        assert_eq!(fits.answers.len(), 40);
    }

    /// A cheap stand-in for a fuzz target: random packets and bit-flipped
    /// real queries must each get a well-formed reply or none, never a panic.
    #[tokio::test]
    async fn random_and_mutated_packets_never_panic() {
        let (r, _tx, _) = responder(table());
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut edns = Edns::new();
        edns.set_max_payload(4096).set_dnssec_ok(true);
        let mut with_edns = query("web.shop.mesh.", RecordType::AAAA);
        with_edns.set_edns(edns);
        let seeds = [
            query("web.shop.mesh.", RecordType::A).to_vec().unwrap(),
            query("nope.mesh.", RecordType::ANY).to_vec().unwrap(),
            with_edns.to_vec().unwrap(),
        ];
        for round in 0..6000 {
            let mut packet = if round % 3 == 0 {
                let len = (next() % 300) as usize;
                (0..len).map(|_| next() as u8).collect::<Vec<u8>>()
            } else {
                seeds[round % seeds.len()].clone()
            };
            for _ in 0..=(next() % 4) {
                if !packet.is_empty() {
                    let at = (next() as usize) % packet.len();
                    packet[at] ^= 1 << (next() % 8);
                }
            }
            if next() % 5 == 0 {
                let cut = (next() as usize) % (packet.len() + 1);
                packet.truncate(cut);
            }
            for transport in [Transport::Udp, Transport::Tcp] {
                if let Some(reply) = r.respond(&packet, transport).await {
                    assert!(reply.len() >= 12);
                    assert_eq!(reply[..2], packet[..2], "reply carries the query's ID");
                    assert!(reply[2] & 0x80 != 0, "reply is a response");
                    if transport == Transport::Udp {
                        assert!(reply.len() <= 4096);
                    }
                }
            }
        }
    }

    #[test]
    fn raw_formerr_keeps_id_opcode_and_rd() {
        let reply = raw_formerr(&[0x01, 0x02, 0x01, 0x00, 0xff, 0xff, 0, 0, 0, 0, 0, 0]);
        let resp = Message::from_vec(&reply).unwrap();
        assert_eq!(resp.metadata.id, 0x0102);
        assert_eq!(resp.metadata.message_type, MessageType::Response);
        assert_eq!(resp.metadata.op_code, OpCode::Query);
        assert!(resp.metadata.recursion_desired);
        assert_eq!(resp.metadata.response_code, ResponseCode::FormErr);
    }
}
