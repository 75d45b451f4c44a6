//! The rendezvous against strangers: stray and silent connections, garbage, other jobs,
//! wrong world sizes, taken ranks, oversize lengths, `localhost`, and fuzzed hellos.
//! Everything stays on loopback and every wait is bounded.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use longview_launch::{
    LaunchError, MAX_JOB_ID_BYTES, MAX_PAYLOAD_BYTES, ProcessEnv, Rank0Listener, job_id_from_vars,
    share_from_rank0_in_job,
};

const PAYLOAD: &[u8] = b"nccl-unique-id-stand-in-0123456789";

fn env(rank: usize, world: usize, host: &str, port: u16) -> ProcessEnv {
    ProcessEnv {
        rank,
        world_size: world,
        local_rank: rank,
        local_world_size: world,
        master_addr: host.into(),
        master_port: port,
    }
}

/// Rank 0 of `job` bound on 127.0.0.1 at a free port, serving in a thread.
fn rank0(
    world: usize,
    job: &str,
    timeout: Duration,
) -> (u16, thread::JoinHandle<Result<(), LaunchError>>) {
    let listener = Rank0Listener::bind(&env(0, world, "127.0.0.1", 0), job).unwrap();
    let port = listener.port();
    assert_ne!(port, 0);
    (
        port,
        thread::spawn(move || listener.serve(PAYLOAD, timeout)),
    )
}

fn join(
    rank: usize,
    world: usize,
    job: &str,
    port: u16,
    timeout: Duration,
) -> Result<Vec<u8>, LaunchError> {
    share_from_rank0_in_job(&env(rank, world, "127.0.0.1", port), job, None, timeout)
}

/// The real ranks `1..world` join; each must get the payload.
fn real_ranks_join(world: usize, job: &str, port: u16) {
    let handles: Vec<_> = (1..world)
        .map(|rank| {
            let job = job.to_string();
            thread::spawn(move || join(rank, world, &job, port, Duration::from_secs(10)))
        })
        .collect();
    for handle in handles {
        assert_eq!(handle.join().unwrap().unwrap(), PAYLOAD);
    }
}

/// A hello written from the protocol description (not with the crate's encoder).
fn hello(rank: u32, world: u32, job: &[u8]) -> Vec<u8> {
    let mut bytes = b"LVRDZV".to_vec();
    bytes.extend_from_slice(&2u16.to_le_bytes());
    bytes.extend_from_slice(&rank.to_le_bytes());
    bytes.extend_from_slice(&world.to_le_bytes());
    bytes.extend_from_slice(&(job.len() as u16).to_le_bytes());
    bytes.extend_from_slice(job);
    bytes
}

fn connect(port: u16) -> TcpStream {
    let give_up = Instant::now() + Duration::from_secs(2);
    let stream = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(stream) => break stream,
            Err(e) if Instant::now() > give_up => panic!("rank 0 does not listen on {port}: {e}"),
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    stream
}

/// Sends `bytes`, closes the sending side, and returns whatever comes back.
fn send(port: u16, bytes: &[u8]) -> Vec<u8> {
    let mut stream = connect(port);
    let _ = stream.write_all(bytes);
    let _ = stream.shutdown(Shutdown::Write);
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    reply
}

/// Whether a reply hands over the payload (status byte 0).
fn is_payload(reply: &[u8]) -> bool {
    reply.len() >= 9 && &reply[..8] == b"LVRDZV\x02\x00" && reply[8] == 0
}

/// The reason in a rejection reply (status byte 1), if it is one.
fn rejection(reply: &[u8]) -> Option<String> {
    (reply.len() >= 13 && &reply[..8] == b"LVRDZV\x02\x00" && reply[8] == 1)
        .then(|| String::from_utf8_lossy(&reply[13..]).into_owned())
}

#[test]
fn stray_connections_do_not_disturb_the_rendezvous() {
    let (port, server) = rank0(3, "job-stray", Duration::from_secs(10));
    let start = Instant::now();
    // A port scan: connect and leave.
    for _ in 0..5 {
        drop(connect(port));
    }
    // Half a hello, then gone.
    send(port, &hello(1, 3, b"job-stray")[..7]);
    // Half a hello, then nothing, with the connection left open.
    let mut stalled = connect(port);
    stalled.write_all(&hello(2, 3, b"job-stray")[..11]).unwrap();
    real_ranks_join(3, "job-stray", port);
    server.join().unwrap().unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "took {:?}: a stalled connection held up rank 0",
        start.elapsed()
    );
    drop(stalled);
}

#[test]
fn garbage_is_turned_away_and_rank0_keeps_waiting() {
    let (port, server) = rank0(3, "job-garbage", Duration::from_secs(10));
    let mut version1 = b"LVRDZV01".to_vec(); // the old protocol, claiming rank 5 of 9
    version1.extend_from_slice(&5u32.to_le_bytes());
    version1.extend_from_slice(&9u32.to_le_bytes());
    let mut future = hello(1, 3, b"job-garbage");
    future[6] = 3; // protocol version 3
    let inputs: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec(),
        vec![0xff; 64],
        vec![0; 3],
        version1,
        future,
        b"LVRDZV\x02\x00garbage".to_vec(),
    ];
    for input in &inputs {
        let reply = send(port, input);
        assert!(!is_payload(&reply), "{input:?} got the payload");
    }
    // Speaks the protocol but is cut short: told why.
    let reply = send(port, b"LVRDZV\x02\x00garbage");
    let reason = rejection(&reply).expect("a rejection");
    assert!(reason.contains("connection closed"), "{reason}");
    real_ranks_join(3, "job-garbage", port);
    server.join().unwrap().unwrap();
}

#[test]
fn silent_connections_hold_up_neither_the_rendezvous_nor_its_timeout() {
    // Ten silent connections, then one more every 50 ms while the ranks join.
    let (port, server) = rank0(4, "job-silent", Duration::from_secs(10));
    let start = Instant::now();
    let silent: Vec<TcpStream> = (0..10).map(|_| connect(port)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let trickle = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            let mut held = Vec::new();
            while !stop.load(Ordering::SeqCst) && held.len() < 100 {
                if let Ok(s) = TcpStream::connect(("127.0.0.1", port)) {
                    held.push(s);
                }
                thread::sleep(Duration::from_millis(50));
            }
        })
    };
    thread::sleep(Duration::from_millis(200));
    real_ranks_join(4, "job-silent", port);
    server.join().unwrap().unwrap();
    stop.store(true, Ordering::SeqCst);
    trickle.join().unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "silent connections held rank 0 for {:?}",
        start.elapsed()
    );
    drop(silent);

    // No real rank comes: the trickle must not keep rank 0 past its 1 s timeout.
    let (port, server) = rank0(2, "job-silent-2", Duration::from_secs(1));
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let trickle = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            let mut held = Vec::new();
            while !stop.load(Ordering::SeqCst) && held.len() < 100 {
                if let Ok(s) = TcpStream::connect(("127.0.0.1", port)) {
                    held.push(s);
                }
                thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let e = server.join().unwrap().unwrap_err().to_string();
    let took = start.elapsed();
    stop.store(true, Ordering::SeqCst);
    trickle.join().unwrap();
    assert!(e.contains("ranks [1] never connected"), "{e}");
    assert!(
        took < Duration::from_millis(2500),
        "timeout of 1 s held for {took:?}"
    );
}

#[test]
fn a_peer_with_the_wrong_world_size_is_turned_away() {
    let (port, server) = rank0(3, "job-world", Duration::from_secs(10));
    let e = join(1, 2, "job-world", port, Duration::from_millis(600))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("world size 2") && e.contains("world size 3"),
        "{e}"
    );
    // Raw hellos announcing other world sizes, including zero and the largest.
    for world in [0, 4, u32::MAX] {
        let reason = rejection(&send(port, &hello(1, world, b"job-world"))).expect("a rejection");
        assert!(reason.contains(&format!("world size {world}")), "{reason}");
    }
    real_ranks_join(3, "job-world", port);
    server.join().unwrap().unwrap();
}

#[test]
fn a_peer_of_another_job_cannot_take_a_rank() {
    let (port, server) = rank0(2, "job-a", Duration::from_secs(10));
    let e = join(1, 2, "job-b", port, Duration::from_millis(600))
        .unwrap_err()
        .to_string();
    assert!(e.contains("another job") && e.contains("job-b"), "{e}");
    // Rank 1 of job-a is still free for the real one.
    assert_eq!(
        join(1, 2, "job-a", port, Duration::from_secs(5)).unwrap(),
        PAYLOAD
    );
    server.join().unwrap().unwrap();
}

#[test]
fn taken_and_out_of_range_ranks_are_turned_away() {
    let (port, server) = rank0(3, "job-dup", Duration::from_secs(10));
    assert_eq!(
        join(1, 3, "job-dup", port, Duration::from_secs(5)).unwrap(),
        PAYLOAD
    );
    let e = join(1, 3, "job-dup", port, Duration::from_millis(400))
        .unwrap_err()
        .to_string();
    assert!(e.contains("rank 1 of this job has already joined"), "{e}");
    for rank in [0, 3, u32::MAX] {
        let reason = rejection(&send(port, &hello(rank, 3, b"job-dup"))).expect("a rejection");
        assert!(
            reason.contains(&format!("rank {rank}, outside")),
            "{reason}"
        );
    }
    assert_eq!(
        join(2, 3, "job-dup", port, Duration::from_secs(5)).unwrap(),
        PAYLOAD
    );
    server.join().unwrap().unwrap();
}

#[test]
fn oversize_lengths_are_refused_naming_the_limit() {
    // A hello whose job id length field says 65535 bytes.
    let (port, server) = rank0(2, "job-big", Duration::from_secs(10));
    let mut big = hello(1, 2, b"");
    big[16..18].copy_from_slice(&u16::MAX.to_le_bytes());
    let reason = rejection(&send(port, &big)).expect("a rejection");
    assert!(
        reason.contains("65535") && reason.contains(&format!("limit of {MAX_JOB_ID_BYTES} bytes")),
        "{reason}"
    );
    real_ranks_join(2, "job-big", port);
    server.join().unwrap().unwrap();

    // A fake rank 0 announcing a 4 GiB payload: refused before any allocation.
    let fake = TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let port = fake.local_addr().unwrap().port();
    fake.set_nonblocking(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let faker = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match fake.accept() {
                    Ok((mut s, _)) => {
                        s.set_nonblocking(false).unwrap();
                        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
                        let mut hello = [0u8; 18 + 7]; // "job-big"
                        let _ = s.read_exact(&mut hello);
                        let mut reply = b"LVRDZV\x02\x00\x00".to_vec();
                        reply.extend_from_slice(&u32::MAX.to_le_bytes());
                        reply.extend_from_slice(&u64::MAX.to_le_bytes());
                        let _ = s.write_all(&reply);
                        let _ = s.shutdown(Shutdown::Write);
                        let _ = s.read_to_end(&mut Vec::new());
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        })
    };
    let e = join(1, 2, "job-big", port, Duration::from_millis(500))
        .unwrap_err()
        .to_string();
    stop.store(true, Ordering::SeqCst);
    faker.join().unwrap();
    assert!(
        e.contains(&u32::MAX.to_string())
            && e.contains(&format!("limit of {MAX_PAYLOAD_BYTES} bytes")),
        "{e}"
    );

    // Limits on this side: the job id and rank 0's payload.
    let long = "j".repeat(MAX_JOB_ID_BYTES + 1);
    let e = job_id_from_vars(|name| (name == "LONGVIEW_JOB_ID").then(|| long.clone()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("LONGVIEW_JOB_ID") && e.contains("at most 256 bytes"),
        "{e}"
    );
    let e = join(1, 2, &long, port, Duration::from_millis(100))
        .unwrap_err()
        .to_string();
    assert!(e.contains("over the limit of 256 bytes"), "{e}");
    let huge = vec![0u8; MAX_PAYLOAD_BYTES + 1];
    let e = share_from_rank0_in_job(
        &env(0, 2, "127.0.0.1", 0),
        "job-big",
        Some(&huge),
        Duration::from_millis(100),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains(&format!("over the limit of {MAX_PAYLOAD_BYTES} bytes")),
        "{e}"
    );
}

/// Rank 0 on `host`, one peer per entry of `peer_hosts`; every peer gets the payload.
fn rendezvous_on(host: &str, peer_hosts: &[String]) -> Vec<SocketAddr> {
    let world = 1 + peer_hosts.len();
    let listener = Rank0Listener::bind(&env(0, world, host, 0), "job-host").unwrap();
    let bound = listener.local_addrs();
    let port = listener.port();
    let server = thread::spawn(move || listener.serve(PAYLOAD, Duration::from_secs(10)));
    let peers: Vec<_> = peer_hosts
        .iter()
        .enumerate()
        .map(|(i, peer_host)| {
            let peer = env(i + 1, world, peer_host, port);
            thread::spawn(move || {
                share_from_rank0_in_job(&peer, "job-host", None, Duration::from_secs(5))
            })
        })
        .collect();
    for (peer, peer_host) in peers.into_iter().zip(peer_hosts) {
        let got = peer.join().unwrap();
        assert_eq!(
            got.unwrap_or_else(|e| panic!("peer via {peer_host}: {e}")),
            PAYLOAD
        );
    }
    server.join().unwrap().unwrap();
    bound
}

#[test]
fn master_addr_localhost_is_reached_on_every_address_it_resolves_to() {
    let resolved: Vec<SocketAddr> = ("localhost", 0).to_socket_addrs().unwrap().collect();
    // One peer through each address `localhost` resolves to, one through the name.
    let mut peers: Vec<String> = resolved.iter().map(|a| a.ip().to_string()).collect();
    peers.push("localhost".into());
    let bound = rendezvous_on("localhost", &peers);
    for addr in &resolved {
        assert!(
            bound.iter().any(|b| b.ip() == addr.ip()),
            "{addr} not in {bound:?}"
        );
    }
    assert!(bound.iter().all(|b| b.ip().is_loopback()), "{bound:?}");
    println!("localhost resolves to {resolved:?}; rank 0 listened on {bound:?}");

    // IPv6 loopback by itself (where the host has it): not an IPv4 wildcard.
    if TcpListener::bind("[::1]:0").is_ok() {
        let bound = rendezvous_on("::1", &["::1".into(), "[::1]".into()]);
        assert!(
            bound.iter().all(|b| b.ip().to_string() == "::1"),
            "{bound:?}"
        );
    } else {
        println!("no IPv6 loopback here; skipped the ::1 part");
    }
}

/// splitmix64: a small seeded generator, so a failing input can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// One mutated hello: a real-looking one with 1-3 mutations, or plain noise.
fn mutated_hello(rng: &mut Rng, world: u32, job: &[u8]) -> Vec<u8> {
    let rank = rng.pick(&[0, 1, 2, world - 1, world, u32::MAX]);
    let mut bytes = hello(rank, world, job);
    for _ in 0..1 + rng.below(3) {
        let len = bytes.len() as u64;
        match rng.below(8) {
            0 if len > 0 => {
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(len) as usize;
                    bytes[at] ^= 1 << rng.below(8);
                }
            }
            1 => bytes.truncate(rng.below(len) as usize),
            2 => bytes.extend((0..rng.below(40)).map(|_| rng.next() as u8)),
            3 if bytes.len() >= 18 => {
                let random = rng.next();
                let (range, value): (std::ops::Range<usize>, u64) = match rng.below(4) {
                    0 => (6..8, rng.pick(&[0, 1, 3, 0xffff])),
                    1 => (
                        8..12,
                        rng.pick(&[0, 1, world as u64, u32::MAX as u64, random]),
                    ),
                    2 => (12..16, rng.pick(&[0, 1, world as u64 + 1, u32::MAX as u64])),
                    _ => (16..18, rng.pick(&[0, 255, 256, 257, 0xffff, random % 300])),
                };
                let n = range.len();
                bytes[range].copy_from_slice(&value.to_le_bytes()[..n]);
            }
            4 => bytes = (0..rng.below(64)).map(|_| rng.next() as u8).collect(),
            5 => {
                bytes = b"LVRDZV01".to_vec();
                bytes.extend_from_slice(&(rng.next() as u32).to_le_bytes());
                bytes.extend_from_slice(&(rng.next() as u32).to_le_bytes());
            }
            6 => {
                let other: Vec<u8> = (0..rng.below(300)).map(|_| rng.next() as u8).collect();
                bytes = hello(rng.pick(&[1, 2]), world, &other);
            }
            _ => bytes.truncate(6 + rng.below(12) as usize),
        }
    }
    bytes
}

/// Whether rank 0 would rightly accept `bytes` as a real rank's hello (those are
/// skipped: they would take a real rank's place).
fn is_valid_hello(bytes: &[u8], world: u32, job: &[u8]) -> bool {
    if bytes.len() < 18 || &bytes[..8] != b"LVRDZV\x02\x00" {
        return false;
    }
    let rank = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
    let w = u32::from_le_bytes(bytes[12..16].try_into().unwrap());
    let len = u16::from_le_bytes([bytes[16], bytes[17]]) as usize;
    w == world
        && (1..world).contains(&rank)
        && bytes.len() >= 18 + len
        && &bytes[18..18 + len] == job
}

#[test]
fn fuzzed_hellos_never_get_through_and_the_rendezvous_completes() {
    const INPUTS: usize = 400;
    const WORLD: u32 = 4;
    let job = "job-fuzz";
    let (port, server) = rank0(WORLD as usize, job, Duration::from_secs(20));
    let start = Instant::now();
    let served = Arc::new(AtomicUsize::new(0));
    // The real ranks join one by one while the fuzzing goes on.
    let (go, ready) = mpsc::channel::<usize>();
    let ranks = {
        let served = Arc::clone(&served);
        thread::spawn(move || {
            for rank in ready {
                let got = join(rank, WORLD as usize, job, port, Duration::from_secs(10)).unwrap();
                assert_eq!(got, PAYLOAD);
                served.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    // LONGVIEW_FUZZ_SEED=<number> replays another sequence.
    let seed = std::env::var("LONGVIEW_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_1234_abcd_0042u64);
    let mut rng = Rng(seed);
    let (mut tried, mut skipped, mut rejected, mut refused) = (0, 0, 0, 0);
    let mut next_rank = 1;
    while tried < INPUTS && start.elapsed() < Duration::from_secs(15) {
        // Rank r joins after r * 100 inputs.
        if next_rank < WORLD as usize && tried >= next_rank * 100 {
            go.send(next_rank).unwrap();
            next_rank += 1;
        }
        let input = mutated_hello(&mut rng, WORLD, job.as_bytes());
        if is_valid_hello(&input, WORLD, job.as_bytes()) {
            skipped += 1;
            continue;
        }
        tried += 1;
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
            refused += 1; // rank 0 is done and no longer listens
            continue;
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let _ = stream.write_all(&input);
        let _ = stream.shutdown(Shutdown::Write);
        let mut reply = Vec::new();
        let _ = stream.read_to_end(&mut reply);
        assert!(
            !is_payload(&reply),
            "input #{tried} {input:?} got the payload"
        );
        rejected += usize::from(rejection(&reply).is_some());
    }
    for rank in next_rank..WORLD as usize {
        go.send(rank).unwrap(); // out of time: the rest join now
    }
    drop(go);
    ranks.join().unwrap();
    server.join().unwrap().unwrap();
    println!(
        "fuzz: seed {seed:#x}: tried {tried} inputs in {:?} ({skipped} valid ones skipped, {rejected} answered \
         with a rejection, {refused} after rank 0 finished)",
        start.elapsed()
    );
    assert_eq!(served.load(Ordering::SeqCst), WORLD as usize - 1);
    assert!(tried >= 300, "only {tried} inputs in the time allowed");
}
