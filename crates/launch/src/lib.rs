//! Multi-process plumbing for longview's collectives (std only, so `cargo xtask` can
//! use it without linking burn):
//!
//! - [`ProcessEnv`]: this process's place in a job, from torchrun's variables (`RANK`,
//!   `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`) or
//!   SLURM's (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, `SLURM_NTASKS_PER_NODE`,
//!   with `MASTER_ADDR`/`MASTER_PORT` set by the job script).
//! - [`share_from_rank0`]: rank 0 serves a byte string over TCP at
//!   `MASTER_ADDR:MASTER_PORT` and every other rank of the same job (see
//!   [`job_id_from_env`]) fetches it (NCCL's unique id). [`Rank0Listener`] is rank 0's
//!   side on its own, for binding before the other ranks start.
//! - [`launch_local`]: starts N copies of a command on this machine with those
//!   variables, prefixes their output with the rank, and stops every rank as soon as
//!   one fails (torchrun's behaviour), so a dead rank never leaves the others hanging.

mod env;
mod launcher;
mod rendezvous;
mod serve;
mod wire;

pub use env::{DEFAULT_JOB_ID, JOB_ID_VARIABLES, ProcessEnv, job_id_from_env, job_id_from_vars};
pub use launcher::{LaunchOptions, launch_local};
pub use rendezvous::{share_from_rank0, share_from_rank0_in_job};
pub use serve::{BIND_VARIABLE, HELLO_TIMEOUT, MAX_PENDING_CONNECTIONS, Rank0Listener};
pub use wire::{MAX_JOB_ID_BYTES, MAX_PAYLOAD_BYTES};

/// What went wrong, naming the variable, address or rank involved.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("environment variable {name}={value:?}: {reason}")]
    Variable {
        name: &'static str,
        value: String,
        reason: String,
    },
    #[error("environment variable {name} is not set: {hint}")]
    Missing { name: &'static str, hint: String },
    #[error("rendezvous at {address}: {reason}")]
    Rendezvous { address: String, reason: String },
    #[error("launcher: {0}")]
    Launch(String),
}
