//! The rendezvous protocol on the wire, and reads that stop at a deadline.
//!
//! Hello (any rank but 0 → rank 0), little-endian:
//!
//! | bytes | field                                   |
//! |-------|-----------------------------------------|
//! | 6     | magic `LVRDZV`                          |
//! | 2     | protocol version ([`VERSION`])          |
//! | 4     | rank                                    |
//! | 4     | world size                              |
//! | 2     | job id length (at most [`MAX_JOB_ID_BYTES`]) |
//! | n     | job id (UTF-8)                          |
//!
//! Reply (rank 0 → the rank): magic, version, one status byte ([`STATUS_OK`] or
//! [`STATUS_REJECTED`]), a u32 length, then that many bytes: the payload (at most
//! [`MAX_PAYLOAD_BYTES`]) or the reason for the rejection (at most [`MAX_REASON_BYTES`]).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Instant;

pub(crate) const MAGIC: &[u8; 6] = b"LVRDZV";
/// Version 1 was `LVRDZV01` followed by the rank and world size, without a job id.
pub(crate) const VERSION: u16 = 2;
pub(crate) const STATUS_OK: u8 = 0;
pub(crate) const STATUS_REJECTED: u8 = 1;

/// Longest job id a hello may carry (longer ones are refused before anything is read).
pub const MAX_JOB_ID_BYTES: usize = 256;
/// Largest payload rank 0 serves and the other ranks accept (NCCL's id is 128 bytes).
pub const MAX_PAYLOAD_BYTES: usize = 1 << 20;
/// Longest rejection reason a rank accepts from rank 0 (longer ones are cut by rank 0).
pub(crate) const MAX_REASON_BYTES: usize = 1024;

/// The fixed part of a hello, before the job id.
const HELLO_HEAD: usize = 6 + 2 + 4 + 4 + 2;
/// The fixed part of a reply, before the payload or reason.
const REPLY_HEAD: usize = 6 + 2 + 1 + 4;

pub(crate) fn encode_hello(rank: u32, world_size: u32, job_id: &str) -> Vec<u8> {
    debug_assert!(job_id.len() <= MAX_JOB_ID_BYTES);
    let mut hello = Vec::with_capacity(HELLO_HEAD + job_id.len());
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(&VERSION.to_le_bytes());
    hello.extend_from_slice(&rank.to_le_bytes());
    hello.extend_from_slice(&world_size.to_le_bytes());
    hello.extend_from_slice(&(job_id.len() as u16).to_le_bytes());
    hello.extend_from_slice(job_id.as_bytes());
    hello
}

/// A well-formed hello; whether it belongs to this job is for rank 0 to decide.
#[derive(Debug)]
pub(crate) struct Hello {
    pub rank: u32,
    pub world_size: u32,
    pub job_id: Vec<u8>,
}

/// Why a hello could not be read.
#[derive(Debug)]
pub(crate) struct BadHello {
    pub reason: String,
    /// The sender speaks this protocol version, so it understands a rejection reply.
    pub answerable: bool,
}

fn bad(reason: String, answerable: bool) -> BadHello {
    BadHello { reason, answerable }
}

/// Reads one hello, giving up at `deadline`; every length is checked before it is used.
pub(crate) fn read_hello(stream: &mut TcpStream, deadline: Instant) -> Result<Hello, BadHello> {
    let mut head = [0u8; HELLO_HEAD];
    read_exact_by(stream, &mut head[..6], deadline, "the magic")
        .map_err(|e| bad(e.to_string(), false))?;
    if &head[..6] != MAGIC {
        return Err(bad(
            format!(
                "not a rendezvous hello (it starts with {})",
                hex_preview(&head[..6])
            ),
            false,
        ));
    }
    read_exact_by(stream, &mut head[6..8], deadline, "the protocol version")
        .map_err(|e| bad(e.to_string(), false))?;
    let version = u16::from_le_bytes([head[6], head[7]]);
    if version != VERSION {
        return Err(bad(
            format!("protocol version {version}, but this rank 0 speaks version {VERSION}"),
            false,
        ));
    }
    read_exact_by(
        stream,
        &mut head[8..],
        deadline,
        "the rank, world size and job id length",
    )
    .map_err(|e| bad(e.to_string(), true))?;
    let rank = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
    let world_size = u32::from_le_bytes(head[12..16].try_into().expect("4 bytes"));
    let job_len = u16::from_le_bytes([head[16], head[17]]) as usize;
    if job_len > MAX_JOB_ID_BYTES {
        return Err(bad(
            format!(
                "job id length {job_len} is over the limit of {MAX_JOB_ID_BYTES} bytes \
                 (MAX_JOB_ID_BYTES)"
            ),
            true,
        ));
    }
    let mut job_id = vec![0u8; job_len];
    read_exact_by(stream, &mut job_id, deadline, "the job id")
        .map_err(|e| bad(e.to_string(), true))?;
    Ok(Hello {
        rank,
        world_size,
        job_id,
    })
}

/// The reply carrying the payload.
pub(crate) fn encode_payload(payload: &[u8]) -> Vec<u8> {
    encode_reply(STATUS_OK, payload)
}

/// The reply turning a rank away, with the reason cut to [`MAX_REASON_BYTES`].
pub(crate) fn encode_rejection(reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(MAX_REASON_BYTES);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    encode_reply(STATUS_REJECTED, &reason.as_bytes()[..end])
}

fn encode_reply(status: u8, body: &[u8]) -> Vec<u8> {
    let mut reply = Vec::with_capacity(REPLY_HEAD + body.len());
    reply.extend_from_slice(MAGIC);
    reply.extend_from_slice(&VERSION.to_le_bytes());
    reply.push(status);
    reply.extend_from_slice(&(body.len() as u32).to_le_bytes());
    reply.extend_from_slice(body);
    reply
}

/// What rank 0 answered.
#[derive(Debug)]
pub(crate) enum Reply {
    Payload(Vec<u8>),
    Rejected(String),
}

/// Reads rank 0's reply, giving up at `deadline`; the length is checked before any
/// buffer is allocated.
pub(crate) fn read_reply(stream: &mut TcpStream, deadline: Instant) -> Result<Reply, String> {
    let mut head = [0u8; REPLY_HEAD];
    read_exact_by(stream, &mut head, deadline, "rank 0's reply").map_err(|e| e.to_string())?;
    if &head[..6] != MAGIC {
        return Err(format!(
            "the process listening there is not a longview rank 0 (its reply starts with {})",
            hex_preview(&head[..6])
        ));
    }
    let version = u16::from_le_bytes([head[6], head[7]]);
    if version != VERSION {
        return Err(format!(
            "rank 0 speaks rendezvous protocol version {version}, this rank version {VERSION}"
        ));
    }
    let len = u32::from_le_bytes(head[9..13].try_into().expect("4 bytes")) as usize;
    let (limit, what) = match head[8] {
        STATUS_OK => (MAX_PAYLOAD_BYTES, "payload"),
        STATUS_REJECTED => (MAX_REASON_BYTES, "rejection reason"),
        other => return Err(format!("rank 0's reply has an unknown status byte {other}")),
    };
    if len > limit {
        return Err(format!(
            "rank 0 announced a {what} of {len} bytes, over the limit of {limit} bytes"
        ));
    }
    let mut body = vec![0u8; len];
    read_exact_by(stream, &mut body, deadline, "rank 0's reply").map_err(|e| e.to_string())?;
    Ok(if head[8] == STATUS_OK {
        Reply::Payload(body)
    } else {
        // Shown on a terminal: no control characters from the network.
        let reason = String::from_utf8_lossy(&body);
        Reply::Rejected(
            reason
                .chars()
                .map(|c| if c.is_control() { '\u{fffd}' } else { c })
                .collect(),
        )
    })
}

/// `read_exact` that stops at `deadline` however slowly the bytes trickle in (a read
/// timeout alone restarts with every byte).
pub(crate) fn read_exact_by(
    stream: &mut TcpStream,
    buf: &mut [u8],
    deadline: Instant,
    what: &str,
) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "timed out reading {what} ({filled} of {} bytes arrived)",
                    buf.len()
                ),
            ));
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf[filled..]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "connection closed while reading {what} ({filled} of {} bytes arrived)",
                        buf.len()
                    ),
                ));
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // A read timeout shows up as WouldBlock on Unix: loop to the deadline check.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(io::Error::new(e.kind(), format!("reading {what}: {e}"))),
        }
    }
    Ok(())
}

/// `write_all` that stops at `deadline` (a peer that reads slowly or never cannot
/// hold the connection past it).
pub(crate) fn write_all_by(
    stream: &mut TcpStream,
    bytes: &[u8],
    deadline: Instant,
) -> io::Result<()> {
    let mut written = 0;
    while written < bytes.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "timed out writing ({written} of {} bytes sent)",
                    bytes.len()
                ),
            ));
        }
        stream.set_write_timeout(Some(left))?;
        match stream.write(&bytes[written..]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "connection closed",
                ));
            }
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn hex_preview(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}
