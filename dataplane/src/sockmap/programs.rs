//! The two eBPF programs, as pure functions from their parameters (map fds
//! and constants) to instructions. `mod.rs` explains the design; this file
//! is the code, one comment per step.
//!
//! Stack layout shared by both programs (offsets from the frame pointer):
//!
//! | slot       | what                                                     |
//! |------------|----------------------------------------------------------|
//! | -16 .. -4  | pair key: address (network order), port (host order), and |
//! |            | for the server pair the other end's address and port      |
//! | -40 .. -20 | state key: the pair key, role, 0                          |
//! | -44        | counter index                                            |
//! | -48        | state value to store                                     |
//! | -56, -52   | LPM key for the VIP trie: prefix length 32, address      |
//!
//! Keys: the client pair (app → VIP, redirected by nftables to meshd) is
//! keyed by the app's address and port alone, the only part of the
//! connection both ends see alike (the app's socket names the VIP, meshd's
//! names 127.0.0.1:15001); conntrack's NAT keeps those unique among
//! redirected connections. The server pair (meshd → app, no NAT) is keyed
//! by the whole connection, meshd's address and port then the app's.
//! Every insert is `BPF_NOEXIST`: a socket whose key is taken by a live
//! one stays on TCP rather than ever receiving another connection's bytes.

use super::asm::{Asm, Cond, FP, R0, R1, R2, R3, R4, R5, R6, R7};

// Helpers (include/uapi/linux/bpf.h, `___BPF_FUNC_MAPPER`).
const MAP_LOOKUP_ELEM: i32 = 1;
const MAP_UPDATE_ELEM: i32 = 2;
const SOCK_HASH_UPDATE: i32 = 70;
const MSG_REDIRECT_HASH: i32 = 71;
const GET_NETNS_COOKIE: i32 = 122;

// `struct bpf_sock_ops` offsets.
const OPS_OP: i16 = 0;
const OPS_FAMILY: i16 = 20;
const OPS_REMOTE_IP4: i16 = 24;
const OPS_LOCAL_IP4: i16 = 28;
const OPS_REMOTE_PORT: i16 = 64;
const OPS_LOCAL_PORT: i16 = 68;
const OPS_SK: i16 = 184;
// `struct bpf_sock` offset of `mark`.
const SOCK_MARK: i16 = 16;
// `struct sk_msg_md` offsets.
const MSG_REMOTE_IP4: i16 = 20;
const MSG_LOCAL_IP4: i16 = 24;
const MSG_REMOTE_PORT: i16 = 60;
const MSG_LOCAL_PORT: i16 = 64;

const ACTIVE_ESTABLISHED: i32 = 4;
const PASSIVE_ESTABLISHED: i32 = 5;
const AF_INET: i32 = 2;
const BPF_ANY: i32 = 0;
const BPF_NOEXIST: i32 = 1;
const BPF_F_INGRESS: i32 = 1;
const SK_PASS: i32 = 1;

/// Which side of which pair a socket is; each has its own sockhash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Role {
    /// An app's connection to a VIP (active, unmarked); key: its local
    /// address and port.
    App = 0,
    /// meshd's accepted socket on the outbound port, the other end of an
    /// `App`; key: its remote address and port (the app's).
    Captured = 1,
    /// meshd's connection to a local app (active, marked, to an app
    /// address); key: its local address and port.
    Upstream = 2,
    /// The local app's accepted socket, the other end of an `Upstream`;
    /// key: its remote address and port (meshd's).
    Workload = 3,
}

impl Role {
    pub(super) const ALL: [Role; 4] = [Role::App, Role::Captured, Role::Upstream, Role::Workload];

    /// The role at the other end.
    pub(super) fn peer(self) -> Role {
        match self {
            Role::App => Role::Captured,
            Role::Captured => Role::App,
            Role::Upstream => Role::Workload,
            Role::Workload => Role::Upstream,
        }
    }

    /// Whether the socket is the one that connected: its first message
    /// decides, once, whether the connection's bytes go by redirect.
    fn active(self) -> bool {
        matches!(self, Role::App | Role::Upstream)
    }
}

/// The state of an active socket (the value in the state map).
pub(crate) mod state {
    /// Established; its peer not yet seen.
    pub(super) const UNSET: i32 = 0;
    /// Its peer is in its sockhash: the next first message redirects.
    pub(super) const ARMED: i32 = 1;
    /// It sent before its peer was seen: plain TCP for its lifetime.
    pub(crate) const PASS: i32 = 2;
    /// Redirecting.
    pub(super) const ACTIVE: i32 = 3;
}

/// Counter slots: connections redirected and left on TCP (the connecting
/// side sent before the other end was accepted), for the client pair (app
/// → meshd) and the server pair (meshd → app).
pub(super) fn counter_index(role: Role, redirected: bool) -> u32 {
    let pair = if role == Role::App { 0 } else { 2 };
    pair + u32::from(!redirected)
}

/// The map fds the programs refer to.
#[derive(Clone, Copy, Debug)]
pub(super) struct Maps {
    /// One sockhash per [`Role`], in `Role as usize` order.
    pub(super) socks: [i32; 4],
    /// LRU hash: state key → state value (active sockets).
    pub(super) state: i32,
    /// LPM trie of the VIP ranges (IPv4).
    pub(super) vips: i32,
    /// Array of u64 counters, [`counter_index`].
    pub(super) counters: i32,
}

/// Constants of the `sock_ops` program.
#[derive(Clone, Debug)]
pub(super) struct SockOpsParams {
    pub(super) netns_cookie: u64,
    pub(super) mark: u32,
    pub(super) outbound_port: u16,
    /// Where meshd connects to local apps (IPv4 only), network order as
    /// the kernel stores them (`u32::from_ne_bytes(octets)`).
    pub(super) app_addrs: Vec<u32>,
}

/// The `sock_ops` program, attached to a cgroup: on every established TCP
/// connection of this network namespace, puts the sockets of the two pairs
/// in their sockhashes.
pub(super) fn sock_ops(p: &SockOpsParams, maps: &Maps) -> Result<Vec<u64>, String> {
    let mut a = Asm::new();
    a.mov(R6, R1);
    a.ldx_w(R2, R6, OPS_OP);
    a.jmp32_imm(Cond::Eq, R2, ACTIVE_ESTABLISHED, "active");
    a.jmp32_imm(Cond::Eq, R2, PASSIVE_ESTABLISHED, "passive");
    a.ja("out");

    a.label("active");
    this_netns_ipv4(&mut a, p.netns_cookie);
    // The socket's mark says whether meshd made it.
    a.ldx_dw(R2, R6, OPS_SK);
    a.jmp_imm(Cond::Eq, R2, 0, "out");
    a.ldx_w(R3, R2, SOCK_MARK);
    a.ldx_w(R4, R6, OPS_REMOTE_IP4);
    a.jmp32_imm(Cond::Eq, R3, p.mark as i32, "marked");
    // Unmarked: an app's connection, if it is to a VIP.
    a.st_w(FP, -56, 32);
    a.stx_w(FP, -52, R4);
    a.ld_map(R1, maps.vips);
    a.stack_addr(R2, -56);
    a.call(MAP_LOOKUP_ELEM);
    a.jmp_imm(Cond::Eq, R0, 0, "out");
    insert_active(&mut a, Role::App, maps);
    a.label("marked");
    // meshd's own: an upstream connection if it is to an app address.
    for addr in &p.app_addrs {
        a.jmp32_imm(Cond::Eq, R4, *addr as i32, "upstream");
    }
    a.ja("out");
    a.label("upstream");
    insert_active(&mut a, Role::Upstream, maps);

    a.label("passive");
    this_netns_ipv4(&mut a, p.netns_cookie);
    // Pair key: the remote address and port, which are the active
    // socket's local ones...
    a.ldx_w(R2, R6, OPS_REMOTE_IP4);
    a.stx_w(FP, -16, R2);
    a.ldx_w(R3, R6, OPS_REMOTE_PORT);
    port_to_host(&mut a, R3);
    a.stx_w(FP, -12, R3);
    a.ldx_w(R2, R6, OPS_LOCAL_PORT);
    a.jmp32_imm(Cond::Eq, R2, i32::from(p.outbound_port), "captured");
    // ...then, for the server pair, this socket's own.
    a.ldx_w(R3, R6, OPS_LOCAL_IP4);
    a.stx_w(FP, -8, R3);
    a.stx_w(FP, -4, R2);
    pair_passive(&mut a, Role::Workload, maps);
    a.label("captured");
    a.st_w(FP, -8, 0);
    a.st_w(FP, -4, 0);
    pair_passive(&mut a, Role::Captured, maps);

    a.label("out");
    a.mov_imm(R0, 1);
    a.exit();
    a.finish()
}

/// Goes to `out` unless the socket is IPv4 and in meshd's namespace.
fn this_netns_ipv4(a: &mut Asm, cookie: u64) {
    a.ldx_w(R2, R6, OPS_FAMILY);
    a.jmp32_imm(Cond::Ne, R2, AF_INET, "out");
    a.mov(R1, R6);
    a.call(GET_NETNS_COOKIE);
    a.ld_imm64(R2, cookie);
    a.jmp_reg(Cond::Ne, R0, R2, "out");
}

/// A remote port as the context gives it (network order, in the high half
/// of the word on little-endian kernels, in the low half on others) to a
/// port number in host order.
fn port_to_host(a: &mut Asm, r: super::asm::Reg) {
    let low = a.fresh("low");
    a.mov(R5, r);
    a.rsh32_imm(R5, 16);
    a.jmp32_imm(Cond::Eq, R5, 0, &low);
    a.mov(r, R5);
    a.label(&low);
    a.be16(r);
}

/// Writes the state key for the pair key at -16 and `role`.
fn state_key(a: &mut Asm, role: Role) {
    for off in [-16, -12, -8, -4] {
        a.ldx_w(R2, FP, off);
        a.stx_w(FP, off - 24, R2);
    }
    a.st_w(FP, -24, role as i32);
    a.st_w(FP, -20, 0);
}

/// An active socket: into its sockhash under its pair key, its state set
/// to UNSET (a reused address and port starts afresh).
fn insert_active(a: &mut Asm, role: Role, maps: &Maps) {
    a.ldx_w(R2, R6, OPS_LOCAL_IP4);
    a.stx_w(FP, -16, R2);
    a.ldx_w(R3, R6, OPS_LOCAL_PORT);
    a.stx_w(FP, -12, R3);
    if role == Role::Upstream {
        a.ldx_w(R2, R6, OPS_REMOTE_IP4);
        a.stx_w(FP, -8, R2);
        a.ldx_w(R3, R6, OPS_REMOTE_PORT);
        port_to_host(a, R3);
        a.stx_w(FP, -4, R3);
    } else {
        a.st_w(FP, -8, 0);
        a.st_w(FP, -4, 0);
    }
    insert_with_state(a, role, maps, state::UNSET);
    a.ja("out");
}

/// This socket into `role`'s sockhash under the pair key at -16 (to `out`
/// if a live socket has the key), then its state set to `value`.
fn insert_with_state(a: &mut Asm, role: Role, maps: &Maps, value: i32) {
    a.mov(R1, R6);
    a.ld_map(R2, maps.socks[role as usize]);
    a.stack_addr(R3, -16);
    a.mov_imm(R4, BPF_NOEXIST);
    a.call(SOCK_HASH_UPDATE);
    a.jmp_imm(Cond::Ne, R0, 0, "out");
    state_key(a, role);
    a.st_w(FP, -48, value);
    a.ld_map(R1, maps.state);
    a.stack_addr(R2, -40);
    a.stack_addr(R3, -48);
    a.mov_imm(R4, BPF_ANY);
    a.call(MAP_UPDATE_ELEM);
}

/// A passive socket whose pair key is at -16: if an active socket of the
/// peer role has that key, it is the other end. Into `role`'s sockhash,
/// then the active end is ARMED if still UNSET (only after the insert, so
/// an ARMED socket's peer is always there to redirect to).
fn pair_passive(a: &mut Asm, role: Role, maps: &Maps) {
    state_key(a, role.peer());
    a.ld_map(R1, maps.state);
    a.stack_addr(R2, -40);
    a.call(MAP_LOOKUP_ELEM);
    a.jmp_imm(Cond::Eq, R0, 0, "out");
    a.mov(R7, R0);
    // This end redirects from its first byte (the other end was in its
    // sockhash before it existed; it cannot send before the accept)...
    insert_with_state(a, role, maps, state::ACTIVE);
    // ...and the other end will, if it has not sent yet.
    a.mov_imm(R0, state::UNSET);
    a.mov_imm(R1, state::ARMED);
    a.cmpxchg32(R7, 0, R1);
    a.ja("out");
}

/// The `sk_msg` program of one role, attached to that role's sockhash: runs
/// on every `sendmsg` of its sockets and moves the bytes into the receive
/// queue of the socket at the other end.
///
/// Bytes never go partly by TCP and then by redirect: the receiver reads
/// redirected bytes first, so that switch would put later bytes before
/// earlier ones. The connecting side decides once, at its first message:
/// redirect only if the other end was already in its sockhash (ARMED),
/// else plain TCP for good (PASS). The accepted side is ACTIVE from the
/// start. The reverse switch is safe (redirected bytes are queued ahead of
/// anything TCP brings later): it is what meshd does when it moves a
/// connection back to TCP (PASS, `Guard`), and what a state lost to LRU
/// eviction does (no state: TCP).
pub(super) fn sk_msg(role: Role, maps: &Maps) -> Result<Vec<u64>, String> {
    let mut a = Asm::new();
    a.mov(R6, R1);
    // The pair key, as `sock_ops` wrote it for this socket.
    let (first, second) = if role.active() {
        (
            (MSG_LOCAL_IP4, MSG_LOCAL_PORT),
            (MSG_REMOTE_IP4, MSG_REMOTE_PORT),
        )
    } else {
        (
            (MSG_REMOTE_IP4, MSG_REMOTE_PORT),
            (MSG_LOCAL_IP4, MSG_LOCAL_PORT),
        )
    };
    let server_pair = matches!(role, Role::Upstream | Role::Workload);
    for (off, (ip, port)) in [(-16, first), (-8, second)] {
        if off == -8 && !server_pair {
            a.st_w(FP, -8, 0);
            a.st_w(FP, -4, 0);
            continue;
        }
        a.ldx_w(R2, R6, ip);
        a.stx_w(FP, off, R2);
        a.ldx_w(R3, R6, port);
        if port == MSG_REMOTE_PORT {
            port_to_host(&mut a, R3);
        }
        a.stx_w(FP, off + 4, R3);
    }
    state_key(&mut a, role);
    a.ld_map(R1, maps.state);
    a.stack_addr(R2, -40);
    a.call(MAP_LOOKUP_ELEM);
    a.jmp_imm(Cond::Eq, R0, 0, "pass");
    a.mov(R7, R0);
    a.ldx_w(R1, R7, 0);
    a.jmp32_imm(Cond::Eq, R1, state::ACTIVE, "redirect");
    if role.active() {
        a.jmp32_imm(Cond::Eq, R1, state::ARMED, "arm");
        a.jmp32_imm(Cond::Ne, R1, state::UNSET, "pass");
        // First message before the other end: PASS, unless armed since.
        a.mov_imm(R0, state::UNSET);
        a.mov_imm(R1, state::PASS);
        a.cmpxchg32(R7, 0, R1);
        a.jmp32_imm(Cond::Eq, R0, state::UNSET, "count_pass");
        a.jmp32_imm(Cond::Ne, R0, state::ARMED, "settled");
        a.label("arm");
        a.mov_imm(R0, state::ARMED);
        a.mov_imm(R1, state::ACTIVE);
        a.cmpxchg32(R7, 0, R1);
        a.jmp32_imm(Cond::Ne, R0, state::ARMED, "settled");
        count(&mut a, maps, counter_index(role, true));
        a.ja("redirect");
        a.label("settled");
        // Another thread's message (or meshd) decided first.
        a.jmp32_imm(Cond::Eq, R0, state::ACTIVE, "redirect");
        a.ja("pass");
        a.label("count_pass");
        count(&mut a, maps, counter_index(role, false));
    }
    a.ja("pass");
    a.label("redirect");
    // Without a peer (it closed) the helper fails and the bytes go by TCP.
    a.mov(R1, R6);
    a.ld_map(R2, maps.socks[role.peer() as usize]);
    a.stack_addr(R3, -16);
    a.mov_imm(R4, BPF_F_INGRESS);
    a.call(MSG_REDIRECT_HASH);
    a.label("pass");
    a.mov_imm(R0, SK_PASS);
    a.exit();
    a.finish()
}

/// Adds one to counter `index`.
fn count(a: &mut Asm, maps: &Maps, index: u32) {
    let skip = a.fresh("count");
    a.st_w(FP, -44, index as i32);
    a.ld_map(R1, maps.counters);
    a.stack_addr(R2, -44);
    a.call(MAP_LOOKUP_ELEM);
    a.jmp_imm(Cond::Eq, R0, 0, &skip);
    a.mov_imm(R1, 1);
    a.atomic_add64(R0, 0, R1);
    a.label(&skip);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn maps() -> Maps {
        Maps {
            socks: [3, 4, 5, 6],
            state: 7,
            vips: 8,
            counters: 9,
        }
    }

    #[test]
    fn every_program_assembles() {
        let p = SockOpsParams {
            netns_cookie: 0x1234_5678_9abc,
            mark: 0x4d48,
            outbound_port: 15001,
            app_addrs: vec![
                u32::from_ne_bytes([127, 0, 0, 1]),
                u32::from_ne_bytes([10, 0, 0, 2]),
            ],
        };
        let ops = sock_ops(&p, &maps()).unwrap();
        assert!(
            ops.len() > 40 && ops.len() < 400,
            "{} instructions",
            ops.len()
        );
        for role in Role::ALL {
            let msg = sk_msg(role, &maps()).unwrap();
            assert!(
                msg.len() > 10 && msg.len() < 200,
                "{role:?}: {} instructions",
                msg.len()
            );
        }
    }

    #[test]
    fn roles_pair_up_and_count_apart() {
        for role in Role::ALL {
            assert_eq!(role.peer().peer(), role);
            assert_ne!(role.peer(), role);
            // One end of each pair connects.
            assert_ne!(role.active(), role.peer().active());
        }
        let slots: std::collections::HashSet<u32> = [Role::App, Role::Upstream]
            .iter()
            .flat_map(|r| [counter_index(*r, true), counter_index(*r, false)])
            .collect();
        assert_eq!(slots.len(), 4);
        assert!(slots.iter().all(|s| *s < super::super::COUNTER_SLOTS));
    }
}
