//! Collectives for longview's parallel layers.
//!
//! [`Communicator`] is the one interface the sequence-parallel code (`longview-parallel`)
//! and the trainer talk to. It follows NCCL's model: every rank of a group calls the
//! same collectives in the same order; point-to-point [`Communicator::send`] is posted
//! without waiting for the receiver (so the next ring block can be in flight while the
//! current one is computed) and [`Communicator::recv`] waits for it.
//!
//! Implementations:
//! - [`local::LocalWorld`]: ranks are threads of one process exchanging host copies of
//!   the tensors. It has the same semantics as the NCCL backend and is what every
//!   sequence-parallel test runs on in CI (no GPU). Reductions add in rank order in f32,
//!   so every rank gets a bit-identical result.
//! - [`nccl::NcclComm`] (feature `nccl`): one process per GPU through cudarc's NCCL
//!   bindings, on Burn's CubeCL CUDA tensors; started by `cargo xtask launch` or
//!   torchrun/SLURM.
//!
//! Failure is an error, never a hang: a rank that stops or panics, a receive that waits
//! longer than the group's timeout, and ranks calling different collectives all end
//! the waiting ranks with a [`CommError`] naming the ranks and the operation.

pub mod deadline;
pub mod local;
#[cfg(feature = "nccl")]
pub mod nccl;

use burn::tensor::kind::Basic;
use burn::tensor::{Device, Tensor};

pub use local::{LinkModel, LocalComm, LocalWorld};

/// How [`Communicator::all_reduce`] and [`Communicator::reduce_scatter`] combine values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Max,
}

/// Why a collective failed. Every variant names the calling rank.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    #[error(
        "rank {rank}: gave up after {waited_s:.1} s waiting for rank {peer} in {op} \
         (the peer is alive but never sent; ranks probably called different collectives \
         or a different number of them)"
    )]
    Timeout {
        rank: usize,
        peer: usize,
        op: String,
        waited_s: f64,
    },
    #[error(
        "rank {rank}: {op} did not complete within {waited_s:.1} s \
         (LONGVIEW_NCCL_TIMEOUT_S); the communicator was aborted. A peer rank died, hangs, \
         or called a different collective (LONGVIEW_NCCL_CHECK=1 compares every \
         collective's signature across ranks)"
    )]
    Stalled {
        rank: usize,
        op: String,
        waited_s: f64,
    },
    #[error(
        "rank {rank}: rank {peer} left the group (it stopped or panicked) while {op} was waiting for it"
    )]
    PeerGone {
        rank: usize,
        peer: usize,
        op: String,
    },
    #[error(
        "rank {rank}: collective mismatch: this rank is in {expected} but rank {peer} sent {found}"
    )]
    Mismatch {
        rank: usize,
        peer: usize,
        expected: String,
        found: String,
    },
    #[error("rank {rank}: {op}: {reason}")]
    InvalidArgument {
        rank: usize,
        op: String,
        reason: String,
    },
}

pub type Result<T> = std::result::Result<T, CommError>;

/// A group of ranks that exchange tensors. Ranks are numbered `0..world_size()` inside
/// the group; sub-groups made by [`Communicator::split`] number their members again
/// from 0.
pub trait Communicator: Send + Sized {
    /// This rank's index in the group.
    fn rank(&self) -> usize;
    /// Number of ranks in the group.
    fn world_size(&self) -> usize;

    /// Posts `tensor` (float, int or bool) to rank `to` and returns without waiting for
    /// the receiver.
    fn send<const D: usize, K: Basic>(&self, tensor: &Tensor<D, K>, to: usize) -> Result<()>;
    /// Waits for the next tensor rank `from` sent to this rank; it lands on `device`.
    fn recv<const D: usize, K: Basic>(&self, from: usize, device: &Device) -> Result<Tensor<D, K>>;

    /// Starts a ring shift: `tensor` goes to rank `to` while a tensor of the same shape
    /// and dtype comes from rank `from`; [`Shift::wait`] returns it. Every rank of the
    /// ring calls this at the same step, so the transfers pair up (NCCL's grouped
    /// send/recv); the caller computes between start and wait, which lets an
    /// asynchronous backend overlap the transfer with the compute.
    fn start_shift<const D: usize, K: Basic>(
        &self,
        tensor: &Tensor<D, K>,
        to: usize,
        from: usize,
    ) -> Result<Shift<'_, D, K>>;

    /// Every rank gets the element-wise reduction of all ranks' tensors (same shape on
    /// every rank).
    fn all_reduce<const D: usize>(&self, tensor: Tensor<D>, op: ReduceOp) -> Result<Tensor<D>>;
    /// Every rank gets all ranks' tensors concatenated along `dim`, in rank order.
    fn all_gather<const D: usize, K: Basic>(
        &self,
        tensor: Tensor<D, K>,
        dim: usize,
    ) -> Result<Tensor<D, K>>;
    /// The reduction of all ranks' tensors, split into `world_size` equal parts along
    /// `dim`; rank `r` gets part `r`.
    fn reduce_scatter<const D: usize>(
        &self,
        tensor: Tensor<D>,
        dim: usize,
        op: ReduceOp,
    ) -> Result<Tensor<D>>;
    /// Every rank gets rank `root`'s tensor; the others pass a tensor of the same shape
    /// (its values are ignored), as NCCL's in-place broadcast.
    fn broadcast<const D: usize>(&self, tensor: Tensor<D>, root: usize) -> Result<Tensor<D>>;
    /// `parts[j]` goes to rank `j`; the result's element `i` is what rank `i` sent here.
    /// What arrives from rank `i` must have the shape and dtype of `parts[i]` (equal
    /// shards, as Ulysses uses it): NCCL sizes its receive buffers from them; the
    /// in-process group happens to accept any shapes.
    fn all_to_all<const D: usize>(&self, parts: Vec<Tensor<D>>) -> Result<Vec<Tensor<D>>>;

    /// Splits the group into disjoint sub-groups. Every rank passes the same partition
    /// (each rank in exactly one group; a group's order numbers its members) and gets
    /// the sub-group it belongs to. Sub-groups have their own channels: their traffic
    /// never mixes with the parent's.
    fn split(&self, groups: &[Vec<usize>]) -> Result<Self>;
}

/// A ring shift in flight ([`Communicator::start_shift`]).
#[must_use = "a started shift must be waited for"]
pub struct Shift<'a, const D: usize, K: Basic> {
    finish: Box<dyn FnOnce() -> Result<Tensor<D, K>> + 'a>,
}

impl<'a, const D: usize, K: Basic> Shift<'a, D, K> {
    /// Wraps the completion of a shift (for implementations of [`Communicator`]).
    pub fn new(finish: impl FnOnce() -> Result<Tensor<D, K>> + 'a) -> Self {
        Shift {
            finish: Box::new(finish),
        }
    }

    /// Waits for the incoming tensor.
    pub fn wait(self) -> Result<Tensor<D, K>> {
        (self.finish)()
    }
}

/// Checks that `groups` partitions `0..world`; the error names the offending rank.
pub fn check_partition(world: usize, groups: &[Vec<usize>]) -> std::result::Result<(), String> {
    let mut seen = vec![false; world];
    for group in groups {
        if group.is_empty() {
            return Err("a sub-group is empty".into());
        }
        for &r in group {
            if r >= world {
                return Err(format!("rank {r} is out of range for a group of {world}"));
            }
            if std::mem::replace(&mut seen[r], true) {
                return Err(format!("rank {r} appears in more than one sub-group"));
            }
        }
    }
    if let Some(missing) = seen.iter().position(|s| !s) {
        return Err(format!("rank {missing} is in no sub-group"));
    }
    Ok(())
}
