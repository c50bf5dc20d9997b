//! Socket redirection ("sockmap"): the bytes between an app and meshd on
//! the same host skip TCP.
//!
//! # Why
//!
//! A captured request crosses loopback TCP twice per host: app → meshd's
//! outbound port on the client, meshd → the app's port on the server, and
//! the answers the same way back. Each crossing is a full trip through the
//! TCP stack (segmentation, ACKs, netfilter with the NAT lookup of the
//! redirect, the loopback device, the backlog). With an sk_msg program the
//! kernel moves the bytes of a `sendmsg` straight into the receive queue of
//! the socket at the other end; TCP still carries the handshake and FIN, so
//! apps and meshd see ordinary sockets. Istio's ambient mode and Merbridge,
//! Cilium's sockops acceleration and Kuma's eBPF mode use the same kernel
//! feature; here it is two small programs meshd assembles and loads itself
//! (no compiler, no object files, no libbpf), kept to meshd's own pairs.
//!
//! # How
//!
//! * A `sock_ops` program, attached (by a BPF link, which ends with meshd's
//!   process however it ends) to the cgroup v2 root, sees every TCP
//!   connection become established. It acts only on IPv4 sockets in
//!   meshd's network namespace (by netns cookie), and only on the four
//!   kinds of socket of [`programs::Role`]: an app's connection to a VIP
//!   (the VIP ranges are in an LPM trie meshd keeps current) and meshd's
//!   socket accepted for it on the outbound port; meshd's own (marked)
//!   connection to an app address and the app's socket accepted for it.
//!   Each goes into its role's sockhash under a key both ends of the pair
//!   can compute (`programs.rs`, "Keys"); a key already taken by a live
//!   socket leaves the newcomer on TCP.
//! * An `sk_msg` program per role, attached to that role's sockhash, runs
//!   on each `sendmsg` and moves the bytes into the receive queue of the
//!   socket at the other end (`bpf_msg_redirect_hash`, `BPF_F_INGRESS`).
//! * Order: a receiver reads redirected bytes before what TCP brought, so a
//!   connection never switches from TCP to redirect mid-stream. The
//!   connecting side decides once, at its first message
//!   (`programs::state`): redirect only if the other end was already in
//!   its sockhash, else plain TCP for good. The other switch, back to TCP,
//!   is safe and is the only one meshd makes ([`Guard`]).
//! * Memory: a redirected byte is in the receiver's queue at once, with no
//!   TCP window to hold the sender back; [`Guard`] bounds what can wait.
//!
//! Counters (connections redirected and left on TCP, per pair, and moved
//! back to TCP) are in `meshd status` and the metrics
//! ([`Accel::counters`]).
//!
//! # Limits
//!
//! * IPv4 only; an app's IPv6 (or IPv4-mapped) connection uses TCP as
//!   before. So does a connection captured by endpoint address rather than
//!   VIP, and a connection to an app address other than the configured ones.
//! * Needs Linux ≥ 5.15 (netns cookie in sock_ops and sk_msg, atomic
//!   compare-and-exchange), a cgroup v2 hierarchy, and CAP_BPF with
//!   CAP_NET_ADMIN. `proxy.sockmap = "auto"` falls back to TCP with a
//!   warning when any of it is missing; `"on"` makes it an error; `"off"`,
//!   the default, does not try.
//! * A bulk transfer goes back to TCP after its first few large writes:
//!   measured here, TCP carried one stream faster than redirection did.
//!   Both sockets then leave their sockhashes ([`Retire`]): the app's once
//!   nothing redirected waits in it, meshd's [`Retire::GRACE`] later (an
//!   app write already on its way into it would otherwise be dropped).
//! * Experimental: it leans on kernel behaviour that has changed between
//!   releases (redirected bytes are charged to the receiver's receive
//!   memory, and so shrink its TCP window, since 6.x; the sockmap read path
//!   neither announces the window again nor waits out a wake-up without
//!   data, so a blocking `recv` can return EAGAIN). The guards keep windows
//!   open and take app sockets out once a guard trips; before that, a
//!   blocking reader thread beside a writer thread that fills the send
//!   buffer can still see that EAGAIN.
//! * When meshd exits, its sockhashes go, and with them any bytes meshd had
//!   redirected that an app had not yet read; the connections themselves
//!   end with meshd anyway.

mod asm;
mod programs;
mod sys;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ipnet::IpNet;

use programs::Role;
pub use sys::BpfError;

/// How many u64 counters the counters map holds (`programs::counter_index`).
pub const COUNTER_SLOTS: u32 = 4;

/// Largest number of sockets per role; beyond it, connections use TCP.
const SOCKETS_PER_ROLE: u32 = 65_536;
/// Active sockets whose state is kept; the least recently used goes first,
/// and a socket without state uses TCP.
const STATE_ENTRIES: u32 = 65_536;
/// VIP ranges the trie can hold.
const VIP_RANGES: u32 = 256;

/// What the programs are built from.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The mark on meshd's own sockets (`capture.mark`).
    pub mark: u32,
    /// meshd's outbound (capture) port.
    pub outbound_port: u16,
    /// Where meshd connects to local apps; IPv6 ones are skipped.
    pub app_addresses: Vec<IpAddr>,
    /// The cgroup v2 directory to attach to; `None`: the root of the first
    /// cgroup2 mount in /proc/self/mountinfo.
    pub cgroup: Option<PathBuf>,
}

/// Why redirection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AccelError {
    #[error(
        "no cgroup v2 hierarchy is mounted (looked in /proc/self/mountinfo and /proc/1/mountinfo)"
    )]
    NoCgroup2,
    #[error("opening the cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading this network namespace's cookie (SO_NETNS_COOKIE, Linux 5.14): {0}")]
    NetnsCookie(#[source] std::io::Error),
    #[error("assembling the {0} program: {1}")]
    Assemble(&'static str, String),
    #[error(transparent)]
    Bpf(#[from] BpfError),
}

/// Connections counted since meshd started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// App → meshd connections (to a VIP) whose bytes are redirected.
    pub client_redirected: u64,
    /// App → meshd connections left on TCP (the app sent before meshd had
    /// accepted).
    pub client_tcp: u64,
    /// meshd → app connections whose bytes are redirected.
    pub server_redirected: u64,
    /// meshd → app connections left on TCP (meshd sent before the app had
    /// accepted).
    pub server_tcp: u64,
    /// Connections a guard moved back to TCP ([`Guard`]).
    pub fell_back: u64,
    /// App sockets taken out of their sockhash after that ([`Retire`]).
    pub taken_out: u64,
    /// meshd's sockets taken out of theirs after the app's ([`Retire`]).
    pub meshd_out: u64,
}

/// Redirection in place; dropping it detaches the programs and frees the
/// maps (sockets in them go back to plain TCP).
pub struct Accel {
    // Field order is drop order: the link first, so no new socket enters
    // the maps while they are being freed.
    _link: OwnedFd,
    _programs: Vec<OwnedFd>,
    socks: Vec<OwnedFd>,
    state: OwnedFd,
    vips: OwnedFd,
    counters: OwnedFd,
    installed: Mutex<Vec<(u32, Ipv4Addr)>>,
    cgroup: PathBuf,
    fell_back: AtomicU64,
    taken_out: AtomicU64,
    meshd_out: AtomicU64,
}

impl std::fmt::Debug for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accel")
            .field("cgroup", &self.cgroup)
            .finish_non_exhaustive()
    }
}

impl Accel {
    /// Loads and attaches the programs for meshd's network namespace (the
    /// one this thread is in).
    pub fn start(settings: &Settings) -> Result<Accel, AccelError> {
        let cgroup = match &settings.cgroup {
            Some(p) => p.clone(),
            None => find_cgroup2().ok_or(AccelError::NoCgroup2)?,
        };
        let cgroup_dir = std::fs::File::open(&cgroup).map_err(|source| AccelError::Cgroup {
            path: cgroup.clone(),
            source,
        })?;
        let probe =
            std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).map_err(AccelError::NetnsCookie)?;
        let netns_cookie = sys::netns_cookie(&probe).map_err(AccelError::NetnsCookie)?;
        drop(probe);

        let mut socks = Vec::new();
        for role in Role::ALL {
            socks.push(sys::map_create(
                &format!("hm_{}", role_name(role)),
                sys::MAP_TYPE_SOCKHASH,
                16,
                // A lookup from user space answers the socket's cookie
                // (8 bytes); an update takes an fd in the same 8.
                8,
                SOCKETS_PER_ROLE,
                0,
            )?);
        }
        let state = sys::map_create("hm_state", sys::MAP_TYPE_HASH_LRU, 24, 4, STATE_ENTRIES, 0)?;
        let vips = sys::map_create(
            "hm_vips",
            sys::MAP_TYPE_LPM_TRIE,
            8,
            1,
            VIP_RANGES,
            sys::F_NO_PREALLOC,
        )?;
        let counters = sys::map_create("hm_counters", sys::MAP_TYPE_ARRAY, 4, 8, COUNTER_SLOTS, 0)?;
        let maps = programs::Maps {
            socks: [0, 1, 2, 3].map(|i| socks[i].as_raw_fd()),
            state: state.as_raw_fd(),
            vips: vips.as_raw_fd(),
            counters: counters.as_raw_fd(),
        };

        let mut progs = Vec::new();
        for role in Role::ALL {
            let insns =
                programs::sk_msg(role, &maps).map_err(|e| AccelError::Assemble("sk_msg", e))?;
            let prog = sys::prog_load(
                &format!("hm_msg_{}", role_name(role)),
                sys::PROG_TYPE_SK_MSG,
                &insns,
            )?;
            sys::prog_attach(
                &socks[role as usize],
                &prog,
                sys::ATTACH_SK_MSG_VERDICT,
                &format!("the {} sockhash", role_name(role)),
            )?;
            progs.push(prog);
        }
        let params = programs::SockOpsParams {
            netns_cookie,
            mark: settings.mark,
            outbound_port: settings.outbound_port,
            app_addrs: settings
                .app_addresses
                .iter()
                .filter_map(|a| match a {
                    IpAddr::V4(v4) => Some(u32::from_ne_bytes(v4.octets())),
                    IpAddr::V6(_) => None,
                })
                .collect(),
        };
        let insns =
            programs::sock_ops(&params, &maps).map_err(|e| AccelError::Assemble("sock_ops", e))?;
        let ops = sys::prog_load("hm_sock_ops", sys::PROG_TYPE_SOCK_OPS, &insns)?;
        let link = sys::link_create(
            &ops,
            &OwnedFd::from(cgroup_dir),
            sys::ATTACH_CGROUP_SOCK_OPS,
            &format!("the cgroup {}", cgroup.display()),
        )?;
        progs.push(ops);
        Ok(Accel {
            _link: link,
            _programs: progs,
            socks,
            state,
            vips,
            counters,
            installed: Mutex::new(Vec::new()),
            cgroup,
            fell_back: AtomicU64::new(0),
            taken_out: AtomicU64::new(0),
            meshd_out: AtomicU64::new(0),
        })
    }

    /// The cgroup the programs are attached to.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Makes the VIP trie hold exactly the IPv4 ranges in `ranges`.
    pub fn set_vip_ranges(&self, ranges: &[IpNet]) -> Result<(), BpfError> {
        let want: Vec<(u32, Ipv4Addr)> = ranges
            .iter()
            .filter_map(|r| match r {
                IpNet::V4(n) => Some((u32::from(n.prefix_len()), n.network())),
                IpNet::V6(_) => None,
            })
            .take(VIP_RANGES as usize)
            .collect();
        let mut installed = self.installed.lock().unwrap_or_else(|e| e.into_inner());
        for (len, addr) in &want {
            sys::map_update(&self.vips, &lpm_key(*len, *addr), &[1], "the VIP ranges")?;
        }
        for old in installed.iter().filter(|o| !want.contains(o)) {
            sys::map_delete(&self.vips, &lpm_key(old.0, old.1), "the VIP ranges")?;
        }
        *installed = want;
        Ok(())
    }

    /// The connection counters.
    pub fn counters(&self) -> Result<Counters, BpfError> {
        let read = |slot: u32| -> Result<u64, BpfError> {
            let mut v = [0u8; 8];
            sys::map_lookup(&self.counters, &slot.to_ne_bytes(), &mut v, "the counters")?;
            Ok(u64::from_ne_bytes(v))
        };
        Ok(Counters {
            client_redirected: read(programs::counter_index(Role::App, true))?,
            client_tcp: read(programs::counter_index(Role::App, false))?,
            server_redirected: read(programs::counter_index(Role::Upstream, true))?,
            server_tcp: read(programs::counter_index(Role::Upstream, false))?,
            fell_back: self.fell_back.load(Ordering::Relaxed),
            taken_out: self.taken_out.load(Ordering::Relaxed),
            meshd_out: self.meshd_out.load(Ordering::Relaxed),
        })
    }

    /// The guards for meshd's socket on the outbound port, accepted from
    /// an app that connected to `original_dst`.
    pub fn guard_client(
        self: &Arc<Self>,
        socket: &tokio::net::TcpStream,
        original_dst: SocketAddr,
    ) -> Option<Guard> {
        let (SocketAddr::V4(app), SocketAddr::V4(dst)) = (socket.peer_addr().ok()?, original_dst)
        else {
            return None;
        };
        let key = PairKey::client(app);
        Some(self.guards(socket, (app, dst), (Role::App, key), Role::Captured))
    }

    /// The guards for meshd's connection to an app.
    pub fn guard_server(self: &Arc<Self>, socket: &tokio::net::TcpStream) -> Option<Guard> {
        let (SocketAddr::V4(mine), SocketAddr::V4(app)) =
            (socket.local_addr().ok()?, socket.peer_addr().ok()?)
        else {
            return None;
        };
        let key = PairKey::server(mine, app);
        Some(self.guards(socket, (app, mine), (Role::Workload, key), Role::Upstream))
    }

    fn guards(
        self: &Arc<Self>,
        socket: &tokio::net::TcpStream,
        app_socket: (SocketAddrV4, SocketAddrV4),
        app_sends: (Role, PairKey),
        meshd_sends: Role,
    ) -> Guard {
        let shared = Arc::new(Shared::default());
        let (app_role, key) = app_sends;
        let own_socket = match (socket.local_addr(), socket.peer_addr()) {
            (Ok(SocketAddr::V4(mine)), Ok(SocketAddr::V4(app))) => Some((mine, app)),
            _ => None,
        };
        Guard {
            reading: ReadGuard {
                accel: self.clone(),
                key: key.state(app_role),
                fd: socket.as_raw_fd(),
                done: false,
                shared: shared.clone(),
            },
            writing: WriteGuard {
                accel: self.clone(),
                key: key.state(meshd_sends),
                app_socket,
                unchecked: 0,
                check_every: WriteGuard::CHECK_MIN,
                bulk: 0,
                done: false,
                shared: shared.clone(),
            },
            retiring: Retire {
                accel: self.clone(),
                role: app_role,
                key,
                meshd_sends,
                app_socket,
                own_socket,
                shared,
            },
        }
    }

    /// Sends the connection with this state key by TCP from now on.
    fn fall_back(&self, key: &[u8; 24], why: &str) {
        if self.set_pass(key, why) {
            self.fell_back.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(why, "connection back on TCP");
        }
    }

    fn set_pass(&self, key: &[u8; 24], why: &str) -> bool {
        match sys::map_update(
            &self.state,
            key,
            &programs::state::PASS.to_ne_bytes(),
            "a connection's state",
        ) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, why, "moving a connection back to TCP failed");
                false
            }
        }
    }
}

/// A redirected byte lands in the receiver's queue at once, whatever its
/// receive buffer: TCP's window, which would make the sender wait, is not
/// in the way. Without a check, a sender faster than its reader piles bytes
/// up in kernel memory without bound (measured: 1 GB in 3 s from an app
/// that writes to an echo service and never reads).
///
/// The kernel counts redirected bytes in the receiving socket's receive
/// memory, so while they wait they also shrink the TCP window that socket
/// announces; and reading them does not announce the window again (the
/// sockmap read path skips the window update a TCP read makes). A
/// direction that went back to TCP while its receiver's queue was near the
/// buffer would then wait on a zero window until the sender's probe timer
/// fired (seconds, with its back-off; seen before these rules). So the
/// guards keep every redirected receiver's queue well under its buffer,
/// where the window stays open:
///
/// * meshd → app ([`WriteGuard`]): meshd is the sender, and waits while
///   the app's socket holds more than [`HOLD_ABOVE`] of its buffer, until
///   it holds less than [`RESUME_BELOW`]; the tunnel's flow control holds
///   the far side back meanwhile, as TCP's window would. An app that stays
///   that slow for [`WriteGuard::HOLD_FOR`], and a bulk transfer, go back
///   to TCP for that direction.
/// * app → meshd ([`ReadGuard`]): the app is the sender, and nothing but
///   TCP's window can hold it back: the direction goes back to TCP as soon
///   as the tunnel is full, or when meshd finds more than [`HOLD_ABOVE`] of
///   its buffer waiting.
///
/// Going back to TCP is for good (the safe switch, `programs.rs`), and for
/// both directions: once one guard trips, [`Retire`] moves the other too,
/// and takes the app's socket out of its sockhash as soon as nothing
/// redirected waits in it, so it is a plain TCP socket again (no `sk_msg`
/// step on its writes, no sockmap read path). Request-and-answer traffic
/// trips none of this.
#[derive(Debug)]
pub struct Guard {
    /// The app's bytes into meshd's socket.
    pub reading: ReadGuard,
    /// meshd's bytes into the app's socket.
    pub writing: WriteGuard,
    /// Run beside the two for as long as the connection lasts.
    pub retiring: Retire,
}

impl Guard {
    /// A connection's guards for its two directions, and the future that
    /// retires its sockets ([`Retire::run`]; pending for ever without a
    /// guard), to run beside them.
    pub fn split(
        guard: Option<Guard>,
    ) -> (
        Option<ReadGuard>,
        Option<WriteGuard>,
        impl std::future::Future<Output = ()>,
    ) {
        let (reading, writing, retiring) = match guard {
            Some(g) => (Some(g.reading), Some(g.writing), Some(g.retiring)),
            None => (None, None, None),
        };
        let retire = async move {
            match retiring {
                Some(r) => r.run().await,
                None => std::future::pending().await,
            }
        };
        (reading, writing, retire)
    }
}

/// What the three parts of a [`Guard`] share.
#[derive(Debug, Default)]
struct Shared {
    /// A guard tripped: the connection goes back to TCP.
    on_tcp: AtomicBool,
    tripped: tokio::sync::Notify,
}

impl Shared {
    fn trip(&self) {
        self.on_tcp.store(true, Ordering::Relaxed);
        self.tripped.notify_one();
    }
}

/// More than this share of a socket's receive buffer waiting (a quarter)
/// is too much.
pub const HOLD_ABOVE: Share = Share(4);
/// meshd resumes writing to an app once less than this share (an eighth)
/// waits.
pub const RESUME_BELOW: Share = Share(8);

/// One n-th of a receive buffer.
#[derive(Clone, Copy, Debug)]
pub struct Share(u32);

impl Share {
    fn of(self, buffer: u32) -> u32 {
        buffer / self.0
    }
}

/// The app → meshd direction: meshd reads the app's bytes only as fast as
/// the tunnel takes them.
#[derive(Debug)]
pub struct ReadGuard {
    accel: Arc<Accel>,
    /// The state key of the app's sends.
    key: [u8; 24],
    fd: std::os::fd::RawFd,
    done: bool,
    shared: Arc<Shared>,
}

impl ReadGuard {
    /// The tunnel has no room for what meshd read: meshd will wait, and
    /// the app must wait too.
    pub fn tunnel_full(&mut self) {
        self.stop("the tunnel is full");
    }

    /// After a read of `got` bytes that asked for `asked`: one that filled
    /// meshd's buffer means more is waiting; how much?
    pub fn after_read(&mut self, got: usize, asked: usize) {
        if self.done || got < asked {
            return;
        }
        match sys::rmem(self.fd) {
            Ok(m) if m.queued > HOLD_ABOVE.of(m.buffer) => {
                self.stop("bytes wait in meshd's socket")
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "SO_MEMINFO"),
        }
    }

    fn stop(&mut self, why: &str) {
        if self.done {
            return;
        }
        self.done = true;
        if !self.shared.on_tcp.load(Ordering::Relaxed) {
            self.accel.fall_back(&self.key, why);
            self.shared.trip();
        }
    }
}

/// The meshd → app direction: the app reads at its own pace. Every so many
/// bytes meshd writes (an eighth of the app's receive buffer, at least
/// [`WriteGuard::CHECK_MIN`]), it asks the kernel how many the app has not
/// read (sock_diag, as `ss -m`), and waits while that is too many.
#[derive(Debug)]
pub struct WriteGuard {
    accel: Arc<Accel>,
    key: [u8; 24],
    app_socket: (SocketAddrV4, SocketAddrV4),
    unchecked: usize,
    check_every: usize,
    bulk: u32,
    done: bool,
    shared: Arc<Shared>,
}

impl WriteGuard {
    pub const CHECK_MIN: usize = 16 << 10;
    pub const CHECK_MAX: usize = 1 << 20;
    /// Writes this large, this many in a row, are a bulk transfer: TCP
    /// carries one faster than redirection does.
    pub const BULK_WRITE: usize = 16 << 10;
    pub const BULK_STREAK: u32 = 4;
    /// An app still behind after this long goes back to TCP, whose window
    /// wakes meshd when the app reads; a wait polls the kernel, from every
    /// millisecond to every [`WriteGuard::POLL_MAX`].
    pub const HOLD_FOR: std::time::Duration = std::time::Duration::from_secs(2);
    pub const POLL_MAX: std::time::Duration = std::time::Duration::from_millis(16);

    /// After meshd wrote `n` bytes to the app: returns once the app's
    /// queue leaves room for more.
    pub async fn after_write(&mut self, n: usize) {
        if self.done || self.shared.on_tcp.load(Ordering::Relaxed) {
            return;
        }
        self.bulk = if n >= Self::BULK_WRITE {
            self.bulk + 1
        } else {
            0
        };
        let bulk = self.bulk >= Self::BULK_STREAK;
        self.unchecked += n;
        if !bulk && self.unchecked < self.check_every {
            return;
        }
        self.unchecked = 0;
        let caught_up = self.wait_for_room().await;
        if bulk || !caught_up {
            self.done = true;
            let why = if bulk {
                "a bulk transfer"
            } else {
                "the app reads slowly"
            };
            self.accel.fall_back(&self.key, why);
            self.shared.trip();
        }
    }

    /// Waits while more than [`HOLD_ABOVE`] of the app's buffer waits, until
    /// less than [`RESUME_BELOW`] does; false if that took longer than
    /// [`WriteGuard::HOLD_FOR`].
    async fn wait_for_room(&mut self) -> bool {
        let started = std::time::Instant::now();
        let mut pause = std::time::Duration::from_millis(1);
        let mut limit = HOLD_ABOVE;
        loop {
            let m = match sys::peer_rmem(self.app_socket.0, self.app_socket.1) {
                Ok(Some(m)) => m,
                // Closed: the next write says so.
                Ok(None) => return true,
                Err(e) => {
                    tracing::debug!(error = %e, "sock_diag");
                    return true;
                }
            };
            self.check_every = (m.buffer as usize / 8).clamp(Self::CHECK_MIN, Self::CHECK_MAX);
            if m.queued <= limit.of(m.buffer) {
                return true;
            }
            if started.elapsed() >= Self::HOLD_FOR {
                return false;
            }
            limit = RESUME_BELOW;
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Self::POLL_MAX);
        }
    }
}

/// Once a guard has tripped: both directions by TCP, and the app's socket,
/// then meshd's, out of their sockhashes when that is safe.
///
/// Leaving a sockhash drops a socket's queue of redirected bytes, so a
/// socket leaves only once that queue is empty for good. The app's socket
/// goes first: both directions are on TCP (nothing new is redirected into
/// it: only meshd's writes were, and they run on this connection's task,
/// between whose steps the switch is made), and then either nothing at all
/// waits in it or the app has read bytes TCP brought, which the kernel
/// gives it only once the redirected ones are read.
///
/// meshd's socket follows (or goes alone and at once, when the app's
/// socket is an IPv6 one, as a server listening on `::` accepts, which the
/// programs never redirect from), so its writes to the app skip the
/// `sk_msg` step (a program run and a copy into a scatterlist on every
/// write, the cost of a bulk stream). What was redirected into it came from the app's
/// writes, in the app's own `sendmsg`: one whose program ran before the
/// switch can still be on its way, between the program's verdict and the
/// kernel queueing the message on meshd's socket (no sleep between them
/// but for meshd's socket lock, held only for meshd's own calls). So
/// meshd's socket waits [`Retire::GRACE`] after the switch, with the app's
/// socket out of its sockhash (its writes no longer run the program), and
/// then until its own redirected queue is empty: nothing waits in it, or
/// meshd has read bytes TCP brought since. A write from the app held inside
/// the kernel for longer than the grace would be lost; that is what keeps
/// socket redirection experimental (docs/ARCHITECTURE.md).
///
/// Either socket's key must still be its own (the sockhash answers the
/// cookie of the socket under a key).
#[derive(Debug)]
pub struct Retire {
    accel: Arc<Accel>,
    /// The app's socket: its role and sockhash key, and its addresses.
    role: Role,
    key: PairKey,
    meshd_sends: Role,
    app_socket: (SocketAddrV4, SocketAddrV4),
    /// meshd's socket (same key, the `meshd_sends` sockhash): local, remote.
    own_socket: Option<(SocketAddrV4, SocketAddrV4)>,
    shared: Arc<Shared>,
}

impl Retire {
    /// How long to wait for a reader to read what was redirected to it.
    pub const WAIT_FOR: std::time::Duration = std::time::Duration::from_secs(30);
    /// How long meshd's socket stays in its sockhash after the app's
    /// writes went back to TCP.
    pub const GRACE: std::time::Duration = std::time::Duration::from_secs(2);

    /// Never returns; dropped with the connection.
    pub async fn run(self) {
        self.shared.tripped.notified().await;
        self.accel
            .set_pass(&self.key.state(self.role), "both directions by TCP");
        self.accel
            .set_pass(&self.key.state(self.meshd_sends), "both directions by TCP");
        let switched = tokio::time::Instant::now();
        let wait = match self.take_out(self.role, self.app_socket, None).await {
            // Its writes ran the programs until now: one may still be on
            // its way into meshd's socket.
            Out::Taken => Self::GRACE,
            // Never in a sockhash (IPv6, as a server listening on `::`
            // accepts): nothing it wrote was ever redirected.
            Out::NotThere { ipv6: true } => std::time::Duration::ZERO,
            // Closed, or out already: as if just taken out.
            Out::NotThere { ipv6: false } => Self::GRACE,
            Out::Stayed => std::time::Duration::MAX,
        };
        if wait != std::time::Duration::MAX
            && let Some(own) = self.own_socket
        {
            tokio::time::sleep_until(switched + wait).await;
            // What meshd had read from TCP when the grace ended: reading
            // more than that means its redirected queue was empty.
            let since = sys::peer_rmem(own.0, own.1)
                .ok()
                .flatten()
                .and_then(|m| m.tcp_read);
            self.take_out(self.meshd_sends, own, Some(since.unwrap_or(u64::MAX)))
                .await;
        }
        std::future::pending::<()>().await;
    }

    /// Takes the socket `addrs` (local, remote) of `role` out of its
    /// sockhash once nothing redirected waits in it: its queue is empty, or
    /// its reader has read more than `read_before` bytes from TCP.
    async fn take_out(
        &self,
        role: Role,
        addrs: (SocketAddrV4, SocketAddrV4),
        read_before: Option<u64>,
    ) -> Out {
        let started = std::time::Instant::now();
        let mut pause = std::time::Duration::from_millis(1);
        loop {
            let m = match sys::peer_rmem(addrs.0, addrs.1) {
                Ok(Some(m)) => m,
                Ok(None) => return Out::NotThere { ipv6: false },
                Err(e) => {
                    tracing::debug!(error = %e, "sock_diag");
                    return Out::Stayed;
                }
            };
            let read_tcp = m.tcp_read.is_some_and(|r| r > read_before.unwrap_or(0));
            if m.queued == 0 || read_tcp {
                let socks = &self.accel.socks[role as usize];
                let mut cookie = [0u8; 8];
                let out = match sys::map_lookup(socks, &self.key.0, &mut cookie, "a sockhash") {
                    Ok(true) if u64::from_ne_bytes(cookie) == m.cookie => {
                        match sys::map_delete(socks, &self.key.0, "a sockhash") {
                            Ok(()) => {
                                let n = if role == self.role {
                                    &self.accel.taken_out
                                } else {
                                    &self.accel.meshd_out
                                };
                                n.fetch_add(1, Ordering::Relaxed);
                                Out::Taken
                            }
                            Err(e) => {
                                tracing::debug!(error = %e, role = role_name(role), "taking a socket out of its sockhash");
                                Out::Stayed
                            }
                        }
                    }
                    // Another socket under its key.
                    Ok(true) => Out::Stayed,
                    // Not in its sockhash.
                    Ok(false) => Out::NotThere { ipv6: m.ipv6 },
                    Err(e) => {
                        tracing::debug!(error = %e, role = role_name(role), "looking up a socket");
                        Out::Stayed
                    }
                };
                return out;
            }
            if started.elapsed() >= Self::WAIT_FOR {
                return Out::Stayed;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(std::time::Duration::from_millis(64));
        }
    }
}

/// What became of a socket [`Retire`] wanted out of its sockhash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Out {
    Taken,
    /// Still in (its queue did not empty in time, or its key holds another
    /// socket, or the kernel would not say).
    Stayed,
    /// Not in its sockhash: closed (sock_diag does not find it), or found
    /// but not there; `ipv6` if it is an IPv6 socket, which never is.
    NotThere {
        ipv6: bool,
    },
}

/// A sockhash key, as `programs.rs` builds it: an address (network
/// order) and a port (host order, 32 bits), twice; the client pair fills
/// only the first (the app's), the server pair both (meshd's, the app's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PairKey([u8; 16]);

impl PairKey {
    fn client(app: SocketAddrV4) -> PairKey {
        let mut k = [0u8; 16];
        put(&mut k[..8], app);
        PairKey(k)
    }

    fn server(meshd: SocketAddrV4, app: SocketAddrV4) -> PairKey {
        let mut k = [0u8; 16];
        put(&mut k[..8], meshd);
        put(&mut k[8..], app);
        PairKey(k)
    }

    /// The state map's key for the socket of `role` in this pair.
    fn state(&self, role: Role) -> [u8; 24] {
        let mut k = [0u8; 24];
        k[..16].copy_from_slice(&self.0);
        k[16..20].copy_from_slice(&(role as u32).to_ne_bytes());
        k
    }
}

fn put(out: &mut [u8], addr: SocketAddrV4) {
    out[..4].copy_from_slice(&addr.ip().octets());
    out[4..8].copy_from_slice(&u32::from(addr.port()).to_ne_bytes());
}

fn lpm_key(prefix_len: u32, addr: Ipv4Addr) -> [u8; 8] {
    let mut k = [0u8; 8];
    k[..4].copy_from_slice(&prefix_len.to_ne_bytes());
    k[4..].copy_from_slice(&addr.octets());
    k
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::App => "app",
        Role::Captured => "captured",
        Role::Upstream => "upstream",
        Role::Workload => "workload",
    }
}

/// The cgroup2 hierarchy: mounted in meshd's mount namespace, or else in
/// init's, reached through `/proc/1/root` (`ip netns exec` remounts `/sys`
/// in a mount namespace of its own, without the cgroup mounts).
fn find_cgroup2() -> Option<PathBuf> {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    cgroup2_root(&read("/proc/self/mountinfo")).or_else(|| {
        cgroup2_root(&read("/proc/1/mountinfo"))
            .map(|p| Path::new("/proc/1/root").join(p.strip_prefix("/").unwrap_or(&p)))
    })
}

/// The mount point of the first cgroup2 file system in a mountinfo text.
fn cgroup2_root(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        left.split_whitespace().nth(4).map(PathBuf::from)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount() {
        let hybrid = "30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                      31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            cgroup2_root(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "35 24 0:30 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_root(unified), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(cgroup2_root("22 1 8:1 / / rw - ext4 /dev/sda1 rw\n"), None);
    }

    #[test]
    fn pair_keys_are_laid_out_as_the_programs_build_them() {
        let app: SocketAddrV4 = "10.0.0.7:40000".parse().unwrap();
        let meshd: SocketAddrV4 = "127.0.0.1:51000".parse().unwrap();
        let c = PairKey::client(app);
        assert_eq!(&c.0[..4], &[10, 0, 0, 7]);
        assert_eq!(&c.0[4..8], &40000u32.to_ne_bytes());
        assert_eq!(&c.0[8..], &[0; 8]);
        let s = PairKey::server(meshd, app);
        assert_eq!(&s.0[..4], &[127, 0, 0, 1]);
        assert_eq!(&s.0[4..8], &51000u32.to_ne_bytes());
        assert_eq!(&s.0[8..12], &[10, 0, 0, 7]);
        let st = s.state(Role::Upstream);
        assert_eq!(&st[..16], &s.0);
        assert_eq!(&st[16..20], &(Role::Upstream as u32).to_ne_bytes());
        assert_eq!(&st[20..], &[0; 4]);
    }

    #[test]
    fn lpm_keys_are_length_then_address() {
        assert_eq!(
            lpm_key(16, Ipv4Addr::new(240, 240, 0, 0)),
            [
                16u32.to_ne_bytes()[0],
                16u32.to_ne_bytes()[1],
                16u32.to_ne_bytes()[2],
                16u32.to_ne_bytes()[3],
                240,
                240,
                0,
                0
            ]
        );
    }
}
