use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::{LaunchError, ProcessEnv};

/// Identifies the protocol and guards against a stranger on the port.
const MAGIC: &[u8; 8] = b"LVRDZV01";

/// Rank 0 passes `payload` (`Some`), every other rank passes `None`; every rank gets
/// rank 0's bytes. Rank 0 waits until all `world_size - 1` ranks have fetched them;
/// the others retry connecting until rank 0 listens. Either side gives up after
/// `timeout` with an error naming the address and the ranks still missing.
pub fn share_from_rank0(
    env: &ProcessEnv,
    payload: Option<&[u8]>,
    timeout: Duration,
) -> Result<Vec<u8>, LaunchError> {
    let address = format!("{}:{}", env.master_addr, env.master_port);
    let fail = |reason: String| LaunchError::Rendezvous {
        address: address.clone(),
        reason,
    };
    let deadline = Instant::now() + timeout;
    if env.rank == 0 {
        let payload =
            payload.ok_or_else(|| fail("rank 0 must provide the bytes to share".into()))?;
        serve(env, payload, deadline, &address).map_err(fail)?;
        Ok(payload.to_vec())
    } else {
        if payload.is_some() {
            return Err(fail(format!(
                "only rank 0 provides the bytes (this is rank {})",
                env.rank
            )));
        }
        fetch(env, deadline, &address).map_err(fail)
    }
}

fn serve(env: &ProcessEnv, payload: &[u8], deadline: Instant, address: &str) -> Result<(), String> {
    // Listen on every interface at the port: MASTER_ADDR names this host for the others.
    let listener = TcpListener::bind(("0.0.0.0", env.master_port))
        .map_err(|e| format!("rank 0 cannot listen on port {}: {e}", env.master_port))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("listener: {e}"))?;
    let mut served = vec![false; env.world_size];
    served[0] = true;
    while served.iter().any(|s| !s) {
        match listener.accept() {
            Ok((mut stream, _)) => {
                stream.set_nonblocking(false).map_err(|e| e.to_string())?;
                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                let mut hello = [0u8; 16];
                if stream.read_exact(&mut hello).is_err() || &hello[..8] != MAGIC {
                    continue; // not one of ours
                }
                let rank = u32::from_le_bytes(hello[8..12].try_into().expect("4 bytes")) as usize;
                let world = u32::from_le_bytes(hello[12..16].try_into().expect("4 bytes")) as usize;
                if world != env.world_size || rank == 0 || rank >= world {
                    return Err(format!(
                        "a process announced rank {rank} of {world}, but this job has {} ranks \
                         (two jobs on the same MASTER_PORT?)",
                        env.world_size
                    ));
                }
                let mut reply = Vec::with_capacity(16 + payload.len());
                reply.extend_from_slice(MAGIC);
                reply.extend_from_slice(&(payload.len() as u64).to_le_bytes());
                reply.extend_from_slice(payload);
                stream
                    .write_all(&reply)
                    .map_err(|e| format!("sending to rank {rank}: {e}"))?;
                served[rank] = true;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<usize> = (0..env.world_size).filter(|&r| !served[r]).collect();
                    return Err(format!("ranks {missing:?} never connected to {address}"));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    }
    Ok(())
}

fn fetch(env: &ProcessEnv, deadline: Instant, address: &str) -> Result<Vec<u8>, String> {
    let target: SocketAddr = address
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve MASTER_ADDR: {e}"))?
        .next()
        .ok_or("MASTER_ADDR resolves to no address")?;
    let mut last_error = String::new();
    loop {
        if Instant::now() >= deadline {
            return Err(format!(
                "rank {} could not fetch from rank 0 before the timeout (last error: {last_error})",
                env.rank
            ));
        }
        match TcpStream::connect_timeout(&target, Duration::from_millis(500)) {
            Ok(mut stream) => {
                let _ = stream.set_read_timeout(Some(
                    deadline
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_millis(1)),
                ));
                let mut hello = Vec::with_capacity(16);
                hello.extend_from_slice(MAGIC);
                hello.extend_from_slice(&(env.rank as u32).to_le_bytes());
                hello.extend_from_slice(&(env.world_size as u32).to_le_bytes());
                if let Err(e) = stream.write_all(&hello) {
                    last_error = e.to_string();
                    continue;
                }
                let mut head = [0u8; 16];
                if let Err(e) = stream.read_exact(&mut head) {
                    last_error = e.to_string();
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                if &head[..8] != MAGIC {
                    return Err(
                        "the process at MASTER_ADDR:MASTER_PORT is not a longview rank 0".into(),
                    );
                }
                let len = u64::from_le_bytes(head[8..].try_into().expect("8 bytes")) as usize;
                let mut payload = vec![0u8; len];
                stream
                    .read_exact(&mut payload)
                    .map_err(|e| format!("reading {len} bytes from rank 0: {e}"))?;
                return Ok(payload);
            }
            Err(e) => {
                last_error = e.to_string();
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}
