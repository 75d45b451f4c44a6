//! Rank 0's side of the rendezvous: listen on `MASTER_ADDR`, vet every hello on its own
//! thread under its own deadline, and hand the payload to each rank of this job once.

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::wire::{self, Hello};
use crate::{LaunchError, ProcessEnv};

/// How long one connection may take to send its hello (and to take the reply); a real
/// rank sends its hello as soon as it connects.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections vetted at the same time; further ones are closed at once (a real rank
/// retries).
pub const MAX_PENDING_CONNECTIONS: usize = 64;
/// Distinct rejection reasons logged; later ones are only counted.
const LOGGED_REJECTIONS: usize = 20;
/// When set, rank 0 listens on this host instead of `MASTER_ADDR` (e.g. `0.0.0.0`).
pub const BIND_VARIABLE: &str = "LONGVIEW_RENDEZVOUS_BIND";

/// `host:port`, bracketing IPv6 literals.
pub(crate) fn display_address(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Every address `host` resolves to at `port`, without repeats (`[::1]` is accepted).
pub(crate) fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    let bare = host.trim().trim_start_matches('[').trim_end_matches(']');
    let mut addrs: Vec<SocketAddr> = Vec::new();
    let resolved = (bare, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {bare:?}: {e}"))?;
    for addr in resolved {
        if !addrs.contains(&addr) {
            addrs.push(addr);
        }
    }
    if addrs.is_empty() {
        return Err(format!("{bare:?} resolves to no address"));
    }
    Ok(addrs)
}

/// Rank 0's listening sockets, bound before any rank is served (so a caller can bind
/// port 0 and tell the others the port).
#[derive(Debug)]
pub struct Rank0Listener {
    listeners: Vec<TcpListener>,
    address: String,
    job_id: String,
    world_size: usize,
}

impl Rank0Listener {
    /// Listens on every address `env.master_addr` resolves to (`localhost` is often both
    /// `::1` and `127.0.0.1`), at `env.master_port`; port 0 takes a free port, the same
    /// on every address. `LONGVIEW_RENDEZVOUS_BIND` overrides the host to listen on.
    /// Fails only when no address can be bound.
    pub fn bind(env: &ProcessEnv, job_id: &str) -> Result<Self, LaunchError> {
        let requested = display_address(&env.master_addr, env.master_port);
        let fail = |reason: String| LaunchError::Rendezvous {
            address: requested.clone(),
            reason,
        };
        if env.rank != 0 {
            return Err(fail(format!(
                "only rank 0 listens (this is rank {})",
                env.rank
            )));
        }
        check_job_id(job_id).map_err(fail)?;
        let host = std::env::var(BIND_VARIABLE)
            .ok()
            .filter(|h| !h.trim().is_empty())
            .unwrap_or_else(|| env.master_addr.clone());
        let addrs = resolve(&host, env.master_port).map_err(|e| fail(format!("rank 0: {e}")))?;
        let mut port = env.master_port;
        let mut listeners = Vec::new();
        let mut failures = Vec::new();
        for mut addr in addrs {
            addr.set_port(port);
            match TcpListener::bind(addr) {
                Ok(listener) => {
                    if port == 0 {
                        port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
                    }
                    listeners.push(listener);
                }
                Err(e) => failures.push(format!("{addr}: {e}")),
            }
        }
        if listeners.is_empty() {
            return Err(fail(format!(
                "rank 0 cannot listen on {host:?} ({}); MASTER_ADDR must name this host, or \
                 set {BIND_VARIABLE} to the address to listen on",
                failures.join("; ")
            )));
        }
        for failure in &failures {
            eprintln!("rendezvous: rank 0 does not listen on {failure} (it listens on the others)");
        }
        for listener in &listeners {
            listener
                .set_nonblocking(true)
                .map_err(|e| fail(format!("listener: {e}")))?;
        }
        let bound = Rank0Listener {
            listeners,
            address: display_address(&host, port),
            job_id: job_id.to_string(),
            world_size: env.world_size,
        };
        let addrs = bound.local_addrs();
        if env.world_size > env.local_world_size && addrs.iter().all(|a| a.ip().is_loopback()) {
            eprintln!(
                "rendezvous: warning: rank 0 listens only on loopback {addrs:?} ({host:?}), \
                 out of reach of ranks on other nodes; set MASTER_ADDR to an address of this \
                 node they can reach, or {BIND_VARIABLE}=0.0.0.0"
            );
        }
        Ok(bound)
    }

    /// The addresses listened on.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// The port listened on (the same on every address).
    pub fn port(&self) -> u16 {
        self.local_addrs().first().map_or(0, SocketAddr::port)
    }

    /// Hands `payload` to each of ranks `1..world_size` of this job, then returns; gives up
    /// after `timeout` naming the ranks that never joined. Strangers, garbage, other jobs,
    /// wrong world sizes and duplicate or out-of-range ranks are turned away (logged on
    /// stderr as `rendezvous: ...`) without disturbing the wait for the real ranks.
    pub fn serve(self, payload: &[u8], timeout: Duration) -> Result<(), LaunchError> {
        let address = self.address.clone();
        serve(self, payload, Instant::now() + timeout)
            .map_err(|reason| LaunchError::Rendezvous { address, reason })
    }
}

pub(crate) fn check_job_id(job_id: &str) -> Result<(), String> {
    if job_id.is_empty() {
        return Err("the job id is empty".into());
    }
    if job_id.len() > wire::MAX_JOB_ID_BYTES {
        return Err(format!(
            "the job id is {} bytes, over the limit of {} bytes",
            job_id.len(),
            wire::MAX_JOB_ID_BYTES
        ));
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Waiting,
    /// A connection claiming this rank is being answered.
    Claimed,
    Served,
}

struct State {
    slots: Vec<Slot>,
    /// Connections being vetted, to be shut down when the rendezvous ends.
    open: HashMap<u64, TcpStream>,
    rejected: usize,
    /// Reasons already logged (a peer that retries is logged once per reason).
    logged: HashSet<String>,
    /// The rendezvous is over: connections cut short now are not worth a line.
    closing: bool,
}

struct Shared {
    job_id: String,
    world_size: usize,
    reply: Vec<u8>,
    deadline: Instant,
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counts a turned-away connection and logs its reason, the first time it is seen
    /// (a peer retrying for the same reason is logged once), up to a limit.
    fn reject(&self, peer: SocketAddr, reason: &str) {
        let mut state = self.lock();
        if state.closing {
            return;
        }
        state.rejected += 1;
        if state.logged.len() >= LOGGED_REJECTIONS || !state.logged.insert(reason.to_string()) {
            return;
        }
        let last = state.logged.len() == LOGGED_REJECTIONS;
        drop(state);
        eprintln!("rendezvous: rank 0 turned away {peer}: {reason}");
        if last {
            eprintln!("rendezvous: further reasons for turning connections away are only counted");
        }
    }
}

fn serve(bound: Rank0Listener, payload: &[u8], deadline: Instant) -> Result<(), String> {
    if payload.len() > wire::MAX_PAYLOAD_BYTES {
        return Err(format!(
            "rank 0's payload is {} bytes, over the limit of {} bytes",
            payload.len(),
            wire::MAX_PAYLOAD_BYTES
        ));
    }
    let mut slots = vec![Slot::Waiting; bound.world_size];
    if let Some(first) = slots.first_mut() {
        *first = Slot::Served;
    }
    let shared = Arc::new(Shared {
        job_id: bound.job_id.clone(),
        world_size: bound.world_size,
        reply: wire::encode_payload(payload),
        deadline,
        state: Mutex::new(State {
            slots,
            open: HashMap::new(),
            rejected: 0,
            logged: HashSet::new(),
            closing: false,
        }),
    });
    let mut handlers: Vec<JoinHandle<()>> = Vec::new();
    let mut next_id = 0u64;
    let mut accept_errors = 0usize;
    let outcome = loop {
        let missing: Vec<usize> = {
            let state = shared.lock();
            (0..state.slots.len())
                .filter(|&r| state.slots[r] != Slot::Served)
                .collect()
        };
        if missing.is_empty() {
            break Ok(());
        }
        if Instant::now() >= deadline {
            let rejected = shared.lock().rejected;
            let turned_away = if rejected > 0 {
                format!(
                    " ({rejected} connection(s) were turned away; see the `rendezvous:` lines \
                     on stderr)"
                )
            } else {
                String::new()
            };
            break Err(format!(
                "ranks {missing:?} never connected to {}{turned_away}",
                bound.address
            ));
        }
        if let Err(e) = reap(&mut handlers) {
            break Err(e);
        }
        let mut accepted = false;
        for listener in &bound.listeners {
            let (stream, peer) = match listener.accept() {
                Ok(connection) => connection,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    // Out of descriptors, a connection reset before accept: not fatal,
                    // and logged only the first few times.
                    accept_errors += 1;
                    if accept_errors <= 5 {
                        eprintln!(
                            "rendezvous: rank 0 accept on {:?}: {e}",
                            listener.local_addr()
                        );
                    }
                    continue;
                }
            };
            accepted = true;
            if handlers.len() >= MAX_PENDING_CONNECTIONS {
                shared.reject(
                    peer,
                    &format!("{MAX_PENDING_CONNECTIONS} connections are already being vetted"),
                );
                continue;
            }
            next_id += 1;
            if let Some(handler) = spawn_handler(&shared, stream, peer, next_id) {
                handlers.push(handler);
            }
        }
        if !accepted {
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    drop(bound); // stop listening before winding down the stragglers
    finish(&shared, handlers).and(outcome)
}

fn spawn_handler(
    shared: &Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    id: u64,
) -> Option<JoinHandle<()>> {
    // Accepted sockets may inherit the listener's non-blocking mode on some systems.
    if let Err(e) = stream.set_nonblocking(false) {
        shared.reject(peer, &format!("cannot configure the connection: {e}"));
        return None;
    }
    if let Ok(clone) = stream.try_clone() {
        shared.lock().open.insert(id, clone);
    }
    let context = Arc::clone(shared);
    let spawned = std::thread::Builder::new()
        .name(format!("rendezvous-{peer}"))
        .spawn(move || {
            handle(&context, stream, peer);
            context.lock().open.remove(&id);
        });
    match spawned {
        Ok(handler) => Some(handler),
        Err(e) => {
            if let Some(stream) = shared.lock().open.remove(&id) {
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
            shared.reject(peer, &format!("cannot start a thread for it: {e}"));
            None
        }
    }
}

/// Joins the handlers that have finished; a panic in one is a bug, reported as such.
fn reap(handlers: &mut Vec<JoinHandle<()>>) -> Result<(), String> {
    let mut panicked = 0;
    let mut index = 0;
    while index < handlers.len() {
        if handlers[index].is_finished() {
            if handlers.swap_remove(index).join().is_err() {
                panicked += 1;
            }
        } else {
            index += 1;
        }
    }
    if panicked > 0 {
        return Err(format!(
            "{panicked} connection handler(s) panicked (a bug in longview-launch)"
        ));
    }
    Ok(())
}

/// Ends the connections still being vetted and waits (briefly) for their threads.
fn finish(shared: &Shared, mut handlers: Vec<JoinHandle<()>>) -> Result<(), String> {
    {
        let mut state = shared.lock();
        state.closing = true;
        for stream in state.open.values() {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }
    let give_up = Instant::now() + Duration::from_secs(1);
    let mut result = reap(&mut handlers);
    while !handlers.is_empty() && Instant::now() < give_up {
        std::thread::sleep(Duration::from_millis(2));
        result = result.and(reap(&mut handlers));
    }
    let (rejected, logged) = {
        let state = shared.lock();
        (state.rejected, state.logged.len())
    };
    if rejected > logged {
        eprintln!("rendezvous: rank 0 turned away {rejected} connection(s) in all");
    }
    result
}

/// Vets one connection: a hello of this job for a rank still waiting gets the payload,
/// anything else is turned away with a reason (sent back when the peer speaks the
/// protocol).
fn handle(shared: &Shared, mut stream: TcpStream, peer: SocketAddr) {
    let deadline = shared.deadline.min(Instant::now() + HELLO_TIMEOUT);
    let _ = stream.set_nodelay(true);
    let hello = match wire::read_hello(&mut stream, deadline) {
        Ok(hello) => hello,
        Err(bad) => {
            if bad.answerable {
                let _ =
                    wire::write_all_by(&mut stream, &wire::encode_rejection(&bad.reason), deadline);
            }
            shared.reject(peer, &bad.reason);
            return;
        }
    };
    let rank = match check_hello(shared, &hello) {
        Ok(rank) => rank,
        Err((to_peer, to_log)) => {
            let _ = wire::write_all_by(&mut stream, &wire::encode_rejection(&to_peer), deadline);
            shared.reject(peer, &to_log);
            return;
        }
    };
    {
        let mut state = shared.lock();
        if state.slots[rank] != Slot::Waiting {
            drop(state);
            let reason = format!("rank {rank} of this job has already joined");
            let _ = wire::write_all_by(&mut stream, &wire::encode_rejection(&reason), deadline);
            shared.reject(peer, &reason);
            return;
        }
        state.slots[rank] = Slot::Claimed;
    }
    let sent = wire::write_all_by(&mut stream, &shared.reply, deadline);
    let mut state = shared.lock();
    match sent {
        Ok(()) => state.slots[rank] = Slot::Served,
        Err(e) => {
            // Free the slot: the rank retries on a new connection.
            state.slots[rank] = Slot::Waiting;
            drop(state);
            eprintln!("rendezvous: rank 0 could not send to rank {rank} at {peer}: {e}");
        }
    }
}

/// The rank a hello of this job claims, or (what the peer is told, what is logged).
fn check_hello(shared: &Shared, hello: &Hello) -> Result<usize, (String, String)> {
    let reject = |to_peer: String, to_log: String| Err((to_peer, to_log));
    if hello.job_id != shared.job_id.as_bytes() {
        let theirs = shown(&hello.job_id);
        return reject(
            format!("rank 0 here serves another job, not job {theirs:?}"),
            format!(
                "its hello is for job {theirs:?}, this is job {:?} (two jobs on one port? \
                 see LONGVIEW_JOB_ID)",
                shared.job_id
            ),
        );
    }
    let (rank, world) = (hello.rank as usize, hello.world_size as usize);
    if world != shared.world_size {
        let reason = format!(
            "it announced world size {world}, but this job has world size {}",
            shared.world_size
        );
        return reject(reason.clone(), reason);
    }
    if rank == 0 || rank >= world {
        let reason = format!("it announced rank {rank}, outside ranks 1..{world}");
        return reject(reason.clone(), reason);
    }
    Ok(rank)
}

/// A job id from the network as text, cut to 64 characters for messages.
fn shown(job_id: &[u8]) -> String {
    let text = String::from_utf8_lossy(job_id);
    if text.chars().count() <= 64 {
        return text.into_owned();
    }
    let cut: String = text.chars().take(64).collect();
    format!("{cut}... ({} bytes)", job_id.len())
}
