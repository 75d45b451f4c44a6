//! Hands rank 0's bytes to every rank: rank 0 listens (see [`crate::Rank0Listener`]),
//! the others connect, say who they are, and read the bytes.

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::serve::{Rank0Listener, check_job_id, display_address, resolve};
use crate::wire::{self, Reply};
use crate::{LaunchError, ProcessEnv, job_id_from_env};

/// How long a rank waits for one connection attempt to be accepted.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a rank waits for rank 0's reply on one connection before trying again
/// (rank 0 answers at once; a silent listener must not hold the rank to its timeout).
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between rounds of attempts.
const RETRY_PAUSE: Duration = Duration::from_millis(50);
/// Pause after rank 0 turned this rank away (it will likely do so again).
const REJECTED_PAUSE: Duration = Duration::from_millis(250);

/// Rank 0 passes `payload` (`Some`), every other rank passes `None`; every rank gets
/// rank 0's bytes. Rank 0 waits until all `world_size - 1` ranks have fetched them;
/// the others retry connecting until rank 0 listens. Either side gives up after
/// `timeout` with an error naming the address and the ranks still missing.
///
/// The ranks identify their job by [`job_id_from_env`] (`LONGVIEW_JOB_ID`,
/// `SLURM_JOB_ID` or `TORCHELASTIC_RUN_ID`); rank 0 serves only hellos of its own job.
pub fn share_from_rank0(
    env: &ProcessEnv,
    payload: Option<&[u8]>,
    timeout: Duration,
) -> Result<Vec<u8>, LaunchError> {
    let job_id = job_id_from_env()?;
    share_from_rank0_in_job(env, &job_id, payload, timeout)
}

/// [`share_from_rank0`] with the job id given rather than read from the environment.
pub fn share_from_rank0_in_job(
    env: &ProcessEnv,
    job_id: &str,
    payload: Option<&[u8]>,
    timeout: Duration,
) -> Result<Vec<u8>, LaunchError> {
    let address = display_address(&env.master_addr, env.master_port);
    let fail = |reason: String| LaunchError::Rendezvous {
        address: address.clone(),
        reason,
    };
    check_job_id(job_id).map_err(fail)?;
    if env.rank == 0 {
        let payload =
            payload.ok_or_else(|| fail("rank 0 must provide the bytes to share".into()))?;
        if payload.len() > wire::MAX_PAYLOAD_BYTES {
            return Err(fail(format!(
                "rank 0's payload is {} bytes, over the limit of {} bytes",
                payload.len(),
                wire::MAX_PAYLOAD_BYTES
            )));
        }
        Rank0Listener::bind(env, job_id)?.serve(payload, timeout)?;
        Ok(payload.to_vec())
    } else {
        if payload.is_some() {
            return Err(fail(format!(
                "only rank 0 provides the bytes (this is rank {})",
                env.rank
            )));
        }
        fetch(env, job_id, Instant::now() + timeout).map_err(fail)
    }
}

/// Tries every address `MASTER_ADDR` resolves to, round after round, until one answers
/// with the payload or the deadline passes.
fn fetch(env: &ProcessEnv, job_id: &str, deadline: Instant) -> Result<Vec<u8>, String> {
    let number = |value: usize, what: &str| {
        u32::try_from(value).map_err(|_| format!("{what} {value} does not fit the protocol (u32)"))
    };
    let hello = wire::encode_hello(
        number(env.rank, "rank")?,
        number(env.world_size, "world size")?,
        job_id,
    );
    let mut last_error = String::from("no attempt finished");
    let mut last_rejection: Option<String> = None;
    loop {
        let mut pause = RETRY_PAUSE;
        match resolve(&env.master_addr, env.master_port) {
            Ok(addrs) => {
                for addr in addrs {
                    if Instant::now() >= deadline {
                        break;
                    }
                    match attempt(addr, &hello, deadline) {
                        Ok(Reply::Payload(payload)) => return Ok(payload),
                        Ok(Reply::Rejected(reason)) => {
                            if last_rejection.as_ref() != Some(&reason) {
                                eprintln!(
                                    "rendezvous: rank {} was turned away by {addr}: {reason} \
                                     (retrying until the timeout)",
                                    env.rank
                                );
                                last_rejection = Some(reason.clone());
                            }
                            last_error = format!("{addr} turned this rank away: {reason}");
                            pause = REJECTED_PAUSE;
                        }
                        Err(e) => last_error = format!("{addr}: {e}"),
                    }
                }
            }
            Err(e) => last_error = format!("MASTER_ADDR: {e}"),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let turned_away = match &last_rejection {
                Some(reason) if !last_error.contains(reason.as_str()) => {
                    format!("; earlier, rank 0 turned it away: {reason}")
                }
                _ => String::new(),
            };
            return Err(format!(
                "rank {} could not fetch from rank 0 before the timeout (job {job_id:?}; \
                 last error: {last_error}{turned_away})",
                env.rank
            ));
        }
        std::thread::sleep(pause.min(left));
    }
}

/// One connection: send the hello, read the reply.
fn attempt(addr: SocketAddr, hello: &[u8], deadline: Instant) -> Result<Reply, String> {
    let left = deadline.saturating_duration_since(Instant::now());
    let mut stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT.min(left))
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let deadline = deadline.min(Instant::now() + REPLY_TIMEOUT);
    wire::write_all_by(&mut stream, hello, deadline)
        .map_err(|e| format!("sending the hello: {e}"))?;
    wire::read_reply(&mut stream, deadline)
}
