#![allow(unsafe_code)]
//! The `bpf(2)` commands meshd uses, on raw attribute buffers (layouts from
//! `union bpf_attr` in include/uapi/linux/bpf.h), each failure naming the
//! command and what it was for.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const MAP_CREATE: i64 = 0;
const MAP_LOOKUP_ELEM: i64 = 1;
const MAP_UPDATE_ELEM: i64 = 2;
const MAP_DELETE_ELEM: i64 = 3;
const PROG_LOAD: i64 = 5;
const PROG_ATTACH: i64 = 8;
const LINK_CREATE: i64 = 28;

pub(super) const MAP_TYPE_HASH_LRU: u32 = 9;
pub(super) const MAP_TYPE_ARRAY: u32 = 2;
pub(super) const MAP_TYPE_LPM_TRIE: u32 = 11;
pub(super) const MAP_TYPE_SOCKHASH: u32 = 18;
pub(super) const F_NO_PREALLOC: u32 = 1;

pub(super) const PROG_TYPE_SOCK_OPS: u32 = 13;
pub(super) const PROG_TYPE_SK_MSG: u32 = 16;
pub(super) const ATTACH_CGROUP_SOCK_OPS: u32 = 3;
pub(super) const ATTACH_SK_MSG_VERDICT: u32 = 7;

/// `union bpf_attr` is 144 bytes in 6.x kernels; more is fine as long as the
/// rest is zero.
const ATTR: usize = 160;

/// A `bpf(2)` failure.
#[derive(Debug, thiserror::Error)]
#[error("bpf({command}) for {what}: {source}{}", log.as_deref().map(|l| format!("\nverifier log:\n{l}")).unwrap_or_default())]
pub struct BpfError {
    pub command: &'static str,
    pub what: String,
    #[source]
    pub source: std::io::Error,
    pub log: Option<String>,
}

impl BpfError {
    /// Whether the kernel refused for want of privilege (EPERM/EACCES) or
    /// lacks the feature (EINVAL on an unknown type, ENOSYS).
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

struct Attr([u8; ATTR]);

impl Attr {
    fn new() -> Attr {
        Attr([0; ATTR])
    }
    fn u32(&mut self, at: usize, v: u32) -> &mut Attr {
        self.0[at..at + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(&mut self, at: usize, v: u64) -> &mut Attr {
        self.0[at..at + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn name(&mut self, at: usize, name: &str) -> &mut Attr {
        let n = name.len().min(15);
        self.0[at..at + n].copy_from_slice(&name.as_bytes()[..n]);
        self
    }
}

fn bpf(cmd: i64, attr: &mut Attr) -> std::io::Result<i64> {
    // SAFETY: the attribute buffer is valid for ATTR bytes for the whole
    // call, and every pointer written into it (keys, values, instructions,
    // the license and the log) outlives the call in the caller's frame.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            ATTR as libc::c_uint,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn fd(r: i64) -> OwnedFd {
    // SAFETY: a successful bpf() that creates an object returns a new fd
    // that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(r as i32) }
}

fn err(command: &'static str, what: &str, source: std::io::Error) -> BpfError {
    BpfError {
        command,
        what: what.to_string(),
        source,
        log: None,
    }
}

/// `BPF_MAP_CREATE`.
pub(super) fn map_create(
    name: &str,
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    flags: u32,
) -> Result<OwnedFd, BpfError> {
    let mut a = Attr::new();
    a.u32(0, map_type)
        .u32(4, key_size)
        .u32(8, value_size)
        .u32(12, max_entries)
        .u32(16, flags)
        .name(28, name);
    bpf(MAP_CREATE, &mut a)
        .map(fd)
        .map_err(|e| err("BPF_MAP_CREATE", &format!("map {name}"), e))
}

/// `BPF_PROG_LOAD`; on a verifier refusal the error carries its log.
pub(super) fn prog_load(name: &str, prog_type: u32, insns: &[u64]) -> Result<OwnedFd, BpfError> {
    let license = CString::new("Apache-2.0").expect("no NUL");
    // The log buffer only on the failure path: 1 MiB is a tenth of meshd's
    // idle RSS.
    let mut log: Vec<u8> = Vec::new();
    let attempt = |log_level: u32, log: &mut [u8]| {
        let mut a = Attr::new();
        a.u32(0, prog_type)
            .u32(4, insns.len() as u32)
            .u64(8, insns.as_ptr() as u64)
            .u64(16, license.as_ptr() as u64)
            .u32(24, log_level)
            .u32(28, if log_level > 0 { log.len() as u32 } else { 0 })
            .u64(
                32,
                if log_level > 0 {
                    log.as_mut_ptr() as u64
                } else {
                    0
                },
            )
            .name(48, name);
        bpf(PROG_LOAD, &mut a)
    };
    match attempt(0, &mut log) {
        Ok(r) => Ok(fd(r)),
        Err(first) => {
            // Load again with the verifier's log, to say why.
            log.resize(1 << 20, 0);
            let text = match attempt(1, &mut log) {
                Ok(r) => return Ok(fd(r)),
                Err(_) => {
                    let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
                    let text = String::from_utf8_lossy(&log[..end]).to_string();
                    // The end of the log says what failed.
                    let lines: Vec<&str> = text.lines().collect();
                    lines[lines.len().saturating_sub(30)..].join("\n")
                }
            };
            Err(BpfError {
                command: "BPF_PROG_LOAD",
                what: format!("program {name}"),
                source: first,
                log: (!text.is_empty()).then_some(text),
            })
        }
    }
}

/// `BPF_PROG_ATTACH` of `prog` to `target` (here: an sk_msg program to a
/// sockhash).
pub(super) fn prog_attach(
    target: &OwnedFd,
    prog: &OwnedFd,
    attach_type: u32,
    what: &str,
) -> Result<(), BpfError> {
    let mut a = Attr::new();
    a.u32(0, target.as_raw_fd() as u32)
        .u32(4, prog.as_raw_fd() as u32)
        .u32(8, attach_type);
    bpf(PROG_ATTACH, &mut a)
        .map(|_| ())
        .map_err(|e| err("BPF_PROG_ATTACH", what, e))
}

/// `BPF_LINK_CREATE`: the attachment lasts as long as the returned fd, so
/// it ends when meshd exits, however it exits.
pub(super) fn link_create(
    prog: &OwnedFd,
    target: &OwnedFd,
    attach_type: u32,
    what: &str,
) -> Result<OwnedFd, BpfError> {
    let mut a = Attr::new();
    a.u32(0, prog.as_raw_fd() as u32)
        .u32(4, target.as_raw_fd() as u32)
        .u32(8, attach_type);
    bpf(LINK_CREATE, &mut a)
        .map(fd)
        .map_err(|e| err("BPF_LINK_CREATE", what, e))
}

/// `BPF_MAP_UPDATE_ELEM` with `BPF_ANY`.
pub(super) fn map_update(
    map: &OwnedFd,
    key: &[u8],
    value: &[u8],
    what: &str,
) -> Result<(), BpfError> {
    let mut a = Attr::new();
    a.u32(0, map.as_raw_fd() as u32)
        .u64(8, key.as_ptr() as u64)
        .u64(16, value.as_ptr() as u64);
    bpf(MAP_UPDATE_ELEM, &mut a)
        .map(|_| ())
        .map_err(|e| err("BPF_MAP_UPDATE_ELEM", what, e))
}

/// `BPF_MAP_DELETE_ELEM`; a missing key is not an error.
pub(super) fn map_delete(map: &OwnedFd, key: &[u8], what: &str) -> Result<(), BpfError> {
    let mut a = Attr::new();
    a.u32(0, map.as_raw_fd() as u32).u64(8, key.as_ptr() as u64);
    match bpf(MAP_DELETE_ELEM, &mut a) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(err("BPF_MAP_DELETE_ELEM", what, e)),
    }
}

/// `BPF_MAP_LOOKUP_ELEM` into `value`; `false` when the key is absent.
pub(super) fn map_lookup(
    map: &OwnedFd,
    key: &[u8],
    value: &mut [u8],
    what: &str,
) -> Result<bool, BpfError> {
    let mut a = Attr::new();
    a.u32(0, map.as_raw_fd() as u32)
        .u64(8, key.as_ptr() as u64)
        .u64(16, value.as_mut_ptr() as u64);
    match bpf(MAP_LOOKUP_ELEM, &mut a) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(err("BPF_MAP_LOOKUP_ELEM", what, e)),
    }
}

/// The cookie of the network namespace `sock` is in (`SO_NETNS_COOKIE`,
/// Linux 5.14).
pub(super) fn netns_cookie(sock: &impl AsRawFd) -> std::io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut v: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: v and len are valid for writing for the call's duration.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut v as *mut u64).cast(),
            &mut len,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(v)
    }
}

/// A socket's receive side: the bytes charged to it (`SK_MEMINFO_RMEM_ALLOC`:
/// with redirection, what waits to be read, redirected or not; the kernel
/// counts redirected bytes there too, so they shrink the TCP window it
/// announces) and its receive buffer (`SK_MEMINFO_RCVBUF`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Rmem {
    pub queued: u32,
    pub buffer: u32,
    /// Bytes TCP delivered that the socket's owner has read (`tcp_info`'s
    /// bytes received, less what waits unread); only from sock_diag.
    pub tcp_read: Option<u64>,
    /// The socket's cookie (what a sockhash lookup answers); only from
    /// sock_diag, else 0.
    pub cookie: u64,
    /// An IPv6 socket (sock_diag's IPv4 lookup finds one whose addresses
    /// are IPv4-mapped: a connection accepted on `::`); only from
    /// sock_diag.
    pub ipv6: bool,
}

/// [`Rmem`] of one of meshd's own sockets (`SO_MEMINFO`).
pub(super) fn rmem(fd: std::os::fd::RawFd) -> std::io::Result<Rmem> {
    const SO_MEMINFO: libc::c_int = 55;
    let mut v = [0u32; 9];
    let mut len = std::mem::size_of_val(&v) as libc::socklen_t;
    // SAFETY: v and len are valid for writing for the call's duration and
    // len is v's size; a closed fd is an error, not undefined behaviour.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_MEMINFO,
            v.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(Rmem {
            queued: v[0],
            buffer: v[1],
            tcp_read: None,
            cookie: 0,
            ipv6: false,
        })
    }
}

/// [`Rmem`] of the TCP socket `local` → `remote` in this network
/// namespace, whoever owns it (sock_diag over netlink, as `ss -m` asks):
/// how much an app has not yet read, and its buffer. `None` if there is no
/// such socket (it closed).
pub(super) fn peer_rmem(
    local: std::net::SocketAddrV4,
    remote: std::net::SocketAddrV4,
) -> std::io::Result<Option<Rmem>> {
    const NETLINK_SOCK_DIAG: libc::c_int = 4;
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLMSG_ERROR: u16 = 2;
    const INET_DIAG_INFO: u16 = 2;
    const INET_DIAG_SKMEMINFO: u16 = 7;
    const REQ_LEN: usize = 16 + 56;
    const MSG_LEN: usize = 72;

    let mut req = [0u8; REQ_LEN];
    req[0..4].copy_from_slice(&(REQ_LEN as u32).to_ne_bytes());
    req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req[6..8].copy_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    let r = &mut req[16..];
    r[0] = libc::AF_INET as u8;
    r[1] = libc::IPPROTO_TCP as u8;
    r[2] = 1 << (INET_DIAG_SKMEMINFO - 1) | 1 << (INET_DIAG_INFO - 1);
    r[4..8].copy_from_slice(&u32::MAX.to_ne_bytes());
    r[8..10].copy_from_slice(&local.port().to_be_bytes());
    r[10..12].copy_from_slice(&remote.port().to_be_bytes());
    r[12..16].copy_from_slice(&local.ip().octets());
    r[28..32].copy_from_slice(&remote.ip().octets());
    // interface 0, cookie INET_DIAG_NOCOOKIE (all ones): look up by address.
    r[48..56].copy_from_slice(&[0xff; 8]);

    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_nl is valid; it addresses the kernel.
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: req and kernel are valid for reading for the call's duration,
    // with the lengths given.
    let sent = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            req.as_ptr().cast(),
            req.len(),
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut buf = [0u8; 2048];
    // SAFETY: buf is valid for writing buf.len() bytes for the call.
    let got = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if got < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(parse_diag_rmem(&buf[..got as usize], NLMSG_ERROR, MSG_LEN))
}

const INET_DIAG_INFO: u16 = 2;
const INET_DIAG_SKMEMINFO: u16 = 7;
/// Where `idiag_rqueue` (bytes TCP delivered, unread) is in
/// `struct inet_diag_msg`, and `tcpi_bytes_received` in `struct tcp_info`.
const RQUEUE_AT: usize = 56;
/// `idiag_cookie`, two u32 (low, high), in `struct inet_diag_msg`.
const COOKIE_AT: usize = 44;
const BYTES_RECEIVED_AT: usize = 128;

/// [`Rmem`] from a sock_diag answer; `None` for an error answer (no such
/// socket) or one without the memory attribute.
fn parse_diag_rmem(msg: &[u8], nlmsg_error: u16, msg_len: usize) -> Option<Rmem> {
    let u16_at = |b: &[u8], i: usize| b.get(i..i + 2).map(|s| u16::from_ne_bytes([s[0], s[1]]));
    let u32_at = |b: &[u8], i: usize| {
        b.get(i..i + 4)
            .map(|s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
    };
    let len = u32_at(msg, 0)? as usize;
    if u16_at(msg, 4)? == nlmsg_error || len > msg.len() {
        return None;
    }
    let rqueue = u32_at(msg, 16 + RQUEUE_AT)?;
    let cookie =
        u64::from(u32_at(msg, 16 + COOKIE_AT)?) | u64::from(u32_at(msg, 16 + COOKIE_AT + 4)?) << 32;
    let mut at = 16 + msg_len;
    let mut mem = None;
    let mut received = None;
    while at + 4 <= len {
        let alen = usize::from(u16_at(msg, at)?);
        if alen < 4 {
            return None;
        }
        match u16_at(msg, at + 2)? {
            INET_DIAG_SKMEMINFO if alen >= 12 => {
                mem = Some((u32_at(msg, at + 4)?, u32_at(msg, at + 8)?));
            }
            INET_DIAG_INFO if alen >= 4 + BYTES_RECEIVED_AT + 8 => {
                let b = msg.get(at + 4 + BYTES_RECEIVED_AT..at + 4 + BYTES_RECEIVED_AT + 8)?;
                received = Some(u64::from_ne_bytes(b.try_into().ok()?));
            }
            _ => {}
        }
        at += (alen + 3) & !3;
    }
    let (queued, buffer) = mem?;
    Some(Rmem {
        queued,
        buffer,
        tcp_read: received.map(|r| r.saturating_sub(u64::from(rqueue))),
        cookie,
        ipv6: msg[16] == libc::AF_INET6 as u8,
    })
}

#[cfg(test)]
mod tests {
    use super::{Rmem, parse_diag_rmem, peer_rmem};
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};

    #[test]
    fn reads_rmem_from_a_diag_answer() {
        let mut m = vec![0u8; 16 + 72];
        m[16 + 56..16 + 60].copy_from_slice(&300u32.to_ne_bytes());
        // An unrelated attribute (5 bytes, padded to 8), then SKMEMINFO.
        m.extend_from_slice(&5u16.to_ne_bytes());
        m.extend_from_slice(&4u16.to_ne_bytes());
        m.extend_from_slice(&[1, 0, 0, 0]);
        m.extend_from_slice(&(4u16 + 36).to_ne_bytes());
        m.extend_from_slice(&7u16.to_ne_bytes());
        m.extend_from_slice(&123_456u32.to_ne_bytes());
        m.extend_from_slice(&131_072u32.to_ne_bytes());
        m.extend_from_slice(&[0; 28]);
        let len = m.len() as u32;
        m[0..4].copy_from_slice(&len.to_ne_bytes());
        m[4..6].copy_from_slice(&20u16.to_ne_bytes());
        let want = Rmem {
            queued: 123_456,
            buffer: 131_072,
            tcp_read: None,
            cookie: 0,
            ipv6: false,
        };
        assert_eq!(parse_diag_rmem(&m, 2, 72), Some(want));
        let mut v6 = m.clone();
        v6[16] = libc::AF_INET6 as u8;
        assert_eq!(
            parse_diag_rmem(&v6, 2, 72),
            Some(Rmem { ipv6: true, ..want })
        );
        // With tcp_info: bytes received 1,000, of which 300 wait.
        let mut info = vec![0u8; 4 + 232];
        let info_len = info.len() as u16;
        info[0..2].copy_from_slice(&info_len.to_ne_bytes());
        info[2..4].copy_from_slice(&2u16.to_ne_bytes());
        info[4 + 128..4 + 136].copy_from_slice(&1_000u64.to_ne_bytes());
        let mut with_info = m.clone();
        with_info.extend_from_slice(&info);
        let len = with_info.len() as u32;
        with_info[0..4].copy_from_slice(&len.to_ne_bytes());
        assert_eq!(
            parse_diag_rmem(&with_info, 2, 72),
            Some(Rmem {
                tcp_read: Some(700),
                ..want
            })
        );
        // An error answer (no such socket).
        m[4..6].copy_from_slice(&2u16.to_ne_bytes());
        assert_eq!(parse_diag_rmem(&m, 2, 72), None);
        // Truncated.
        assert_eq!(parse_diag_rmem(&m[..10], 2, 72), None);
    }

    /// The kernel's own answer for a real socket: what waits, and what the
    /// owner has read.
    #[test]
    fn asks_the_kernel_about_a_real_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut sender = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut receiver, _) = listener.accept().unwrap();
        sender.write_all(&[7u8; 10_000]).unwrap();
        let mut got = [0u8; 4_000];
        receiver.read_exact(&mut got).unwrap();
        let (SocketAddr::V4(local), SocketAddr::V4(remote)) = (
            receiver.local_addr().unwrap(),
            receiver.peer_addr().unwrap(),
        ) else {
            panic!("IPv4 loopback");
        };
        let mut m = peer_rmem(local, remote).unwrap().expect("the socket");
        for _ in 0..100 {
            if m.tcp_read == Some(4_000) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
            m = peer_rmem(local, remote).unwrap().expect("the socket");
        }
        assert_eq!(m.tcp_read, Some(4_000), "{m:?}");
        assert!(m.queued > 0 && m.buffer > 0 && m.cookie != 0, "{m:?}");
        receiver.read_exact(&mut [0u8; 6_000]).unwrap();
        let m = peer_rmem(local, remote).unwrap().expect("the socket");
        assert_eq!(m.tcp_read, Some(10_000), "{m:?}");
        assert_eq!(m.queued, 0, "{m:?}");
        assert!(!m.ipv6, "{m:?}");
        drop(receiver);
        drop(sender);
    }

    /// A connection from an IPv4 address accepted on `::` is an IPv6
    /// socket that the IPv4 lookup finds (what a server listening on `::`
    /// has; the programs never put one in a sockhash).
    #[test]
    fn finds_an_ipv4_mapped_socket_and_says_it_is_ipv6() {
        let listener = TcpListener::bind("[::]:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let sender = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (receiver, _) = listener.accept().unwrap();
        let SocketAddr::V4(remote) = sender.local_addr().unwrap() else {
            panic!("IPv4 loopback");
        };
        let local = std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, port);
        let m = peer_rmem(local, remote).unwrap().expect("the socket");
        assert!(m.ipv6, "{m:?}");
        drop(receiver);
    }
}
