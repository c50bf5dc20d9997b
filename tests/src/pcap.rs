//! Just enough of a pcap reader to check what crossed a test link: the
//! classic pcap file format with Ethernet frames (what tcpdump writes for a
//! veth), IPv4 and IPv6, TCP and UDP payloads. No checksums, no IP
//! fragments, no TCP reassembly beyond concatenating in-order segments (a
//! veth between namespaces neither reorders nor loses).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

/// One direction of one flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Flow {
    pub proto: Proto,
    pub src: (IpAddr, u16),
    pub dst: (IpAddr, u16),
}

#[derive(Debug, Default)]
pub struct Capture {
    /// TCP: the payload bytes of each direction, in capture order.
    pub tcp: BTreeMap<Flow, Vec<u8>>,
    /// UDP: each datagram's payload.
    pub udp: BTreeMap<Flow, Vec<Vec<u8>>>,
}

pub fn read(bytes: &[u8]) -> Result<Capture, String> {
    if bytes.len() < 24 {
        return Err("shorter than a pcap header".into());
    }
    let magic = u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes"));
    let le = match magic {
        0xa1b2_c3d4 | 0xa1b2_3c4d => true,
        0xd4c3_b2a1 | 0x4d3c_b2a1 => false,
        other => return Err(format!("not a pcap file (magic {other:#x})")),
    };
    let u32_at = |b: &[u8], at: usize| -> u32 {
        let a: [u8; 4] = b[at..at + 4].try_into().expect("4 bytes");
        if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    };
    let linktype = u32_at(bytes, 20);
    if linktype != 1 {
        return Err(format!("link type {linktype}, not Ethernet"));
    }
    let mut out = Capture::default();
    let mut at = 24;
    while at + 16 <= bytes.len() {
        let caplen = u32_at(bytes, at + 8) as usize;
        let start = at + 16;
        let end = start + caplen;
        if end > bytes.len() {
            break; // a record cut short by the end of the capture
        }
        frame(&bytes[start..end], &mut out);
        at = end;
    }
    Ok(out)
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn frame(f: &[u8], out: &mut Capture) {
    if f.len() < 14 {
        return;
    }
    let ip = &f[14..];
    let (src, dst, proto, payload) = match be16(f, 12) {
        0x0800 if ip.len() >= 20 => {
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let total = usize::from(be16(ip, 2)).min(ip.len());
            if ihl < 20 || total < ihl {
                return;
            }
            let src = IpAddr::V4(Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]));
            let dst = IpAddr::V4(Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]));
            (src, dst, ip[9], &ip[ihl..total])
        }
        0x86dd if ip.len() >= 40 => {
            let len = (usize::from(be16(ip, 4)) + 40).min(ip.len());
            let a: [u8; 16] = ip[8..24].try_into().expect("16 bytes");
            let b: [u8; 16] = ip[24..40].try_into().expect("16 bytes");
            (
                IpAddr::V6(Ipv6Addr::from(a)),
                IpAddr::V6(Ipv6Addr::from(b)),
                ip[6],
                &ip[40..len],
            )
        }
        _ => return,
    };
    match proto {
        6 if payload.len() >= 20 => {
            let off = usize::from(payload[12] >> 4) * 4;
            if off < 20 || off > payload.len() {
                return;
            }
            let flow = Flow {
                proto: Proto::Tcp,
                src: (src, be16(payload, 0)),
                dst: (dst, be16(payload, 2)),
            };
            let data = &payload[off..];
            if !data.is_empty() {
                out.tcp.entry(flow).or_default().extend_from_slice(data);
            }
        }
        17 if payload.len() >= 8 => {
            let flow = Flow {
                proto: Proto::Udp,
                src: (src, be16(payload, 0)),
                dst: (dst, be16(payload, 2)),
            };
            out.udp.entry(flow).or_default().push(payload[8..].to_vec());
        }
        _ => {}
    }
}

/// What a byte stream holds as TLS records (RFC 8446 §5.1).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TlsRecords {
    pub handshake: usize,
    pub application_data: usize,
    /// Bytes carried in application-data records.
    pub application_bytes: usize,
    /// Bytes before the first record (a capture started mid-record).
    pub skipped: usize,
}

/// Parses `stream` as back-to-back TLS records, allowing a partial record
/// at either end (the capture may start or stop inside one). The start is
/// the first offset from which three records parse in a row. Fails if any
/// byte after that is not part of a well-formed record.
pub fn tls_records(stream: &[u8]) -> Result<TlsRecords, String> {
    let header_ok = |at: usize| -> Option<usize> {
        let h = stream.get(at..at + 5)?;
        let len = usize::from(be16(h, 3));
        let version_ok = h[1] == 3 && (1..=4).contains(&h[2]);
        ((20..=23).contains(&h[0]) && version_ok && len > 0 && len <= (1 << 14) + 256)
            .then_some(5 + len)
    };
    let chain_from = |start: usize| -> bool {
        let mut at = start;
        for _ in 0..3 {
            match header_ok(at) {
                Some(n) => at += n,
                None => return at >= stream.len() && at > start,
            }
        }
        true
    };
    let start = (0..stream.len())
        .find(|&s| chain_from(s))
        .ok_or_else(|| "no TLS record found".to_string())?;
    let mut out = TlsRecords {
        skipped: start,
        ..TlsRecords::default()
    };
    let mut at = start;
    while at < stream.len() {
        if stream.len() - at < 5 {
            break; // a header cut by the end of the capture
        }
        let Some(n) = header_ok(at) else {
            return Err(format!(
                "bytes at offset {at} are not a TLS record header: {:02x?}",
                &stream[at..(at + 8).min(stream.len())]
            ));
        };
        match stream[at] {
            22 => out.handshake += 1,
            23 => {
                out.application_data += 1;
                out.application_bytes += (n - 5).min(stream.len() - at - 5);
            }
            _ => {}
        }
        at += n;
    }
    Ok(out)
}

/// Whether a UDP payload has the shape of a QUIC version 1 packet (RFC
/// 9000 §17): a long header naming version 1, or a short header long
/// enough for a connection ID, a packet number and an AEAD tag. The fixed
/// bit is not checked: quinn greases it (RFC 9287) when the peer allows.
pub fn is_quic_v1(datagram: &[u8]) -> bool {
    match datagram.first() {
        Some(&b) if b & 0x80 != 0 => datagram.get(1..5) == Some(&[0, 0, 0, 1]),
        Some(_) => datagram.len() >= 1 + 8 + 1 + 16,
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: u8, len: usize) -> Vec<u8> {
        let mut r = vec![kind, 3, 3, (len >> 8) as u8, len as u8];
        r.extend(std::iter::repeat_n(0xab, len));
        r
    }

    #[test]
    fn records_are_counted_and_a_partial_start_is_skipped() {
        let mut s = vec![0x99, 0x10, 0x42];
        for r in [
            record(22, 40),
            record(23, 100),
            record(23, 300),
            record(23, 7),
        ] {
            s.extend(r);
        }
        s.extend(&record(23, 50)[..20]);
        let got = tls_records(&s).unwrap();
        assert_eq!(got.skipped, 3);
        assert_eq!(got.handshake, 1);
        assert_eq!(got.application_data, 4);
        assert_eq!(got.application_bytes, 100 + 300 + 7 + 15);
    }

    #[test]
    fn plaintext_is_not_tls() {
        assert!(tls_records(b"POST / HTTP/1.1\r\nHost: web\r\n\r\nhello").is_err());
        let mut s = record(23, 10);
        s.extend(b"GET / HTTP/1.1\r\n\r\n");
        assert!(tls_records(&s).is_err());
    }
}
