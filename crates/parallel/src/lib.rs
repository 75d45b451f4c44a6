//! Sequence parallelism for longview (LongVILA MM-SP attention, LightSeq's
//! head-count-agnostic ring, DeepSpeed-Ulysses).
//!
//! Each scheme is a pair of functions: a forward that returns the attention output O
//! and its log-sum-exp (f32, what checkpointing keeps so the forward never re-runs) and
//! a backward that takes O, LSE and dO and returns dQ, dK, dV. Every rank passes its
//! own shard of the sequence, laid out by [`layout::SeqLayout`]; outputs and gradients
//! come back in the same layout.
//!
//! - [`ring`]: K/V blocks travel around the ring ([`ring::RingBalance::Plain`] or the
//!   causal load-balanced [`ring::RingBalance::Zigzag`]); dK/dV travel on a second ring
//!   and arrive home after P hops, accumulated in f32. docs/algorithms.md section 2.
//! - [`ulysses`]: all-to-all from sequence shards to head shards and back; GQA with
//!   more ranks than kv heads replicates kv heads and sums their gradients. Section 3.
//! - [`two_d`]: Ulysses inside groups of contiguous ranks (one node) x zigzag ring
//!   across strided ranks; zigzag chunk pairs are taken first, then split U ways.
//!   Section 4.
//!
//! - [`inference`]: sequence-parallel prefill (zigzag ring) and decode against a KV
//!   cache sharded over the ranks, partial results merged.
//!
//! The per-block attention ([`block`]) returns f32 O and LSE whatever the input dtype.
//! With the `flash` feature (on in `nccl` builds), f16/bf16 blocks on a CUDA device
//! run the flash kernels of `longview-kernels` (`burn_op::flash_attention`, and the
//! backward from the final LSE and delta): the tensor-core kernels where they can run
//! (sm_80+, head dim a multiple of 8 up to 128), the scalar kernels otherwise; no
//! `[Sq, Sk]` score block is stored. f32 blocks, packed sequences, head dims past the
//! kernels' limit and the CPU keep plain tensor ops (one score block at a time).

pub mod autodiff;
pub mod block;
pub mod inference;
pub mod layout;
pub mod model;
pub mod ring;
pub mod two_d;
pub mod ulysses;

use longview_comm::CommError;

/// Why a sequence-parallel call was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ParallelError {
    #[error(transparent)]
    Comm(#[from] CommError),
    #[error(
        "Ulysses degree {degree} does not fit {q_heads} query heads / {kv_heads} kv heads: \
         the degree must divide the query heads, and divide the kv heads when it is at most \
         their number, or be a multiple of them when it exceeds it ({rule})"
    )]
    Heads {
        q_heads: usize,
        kv_heads: usize,
        degree: usize,
        rule: &'static str,
    },
    #[error(
        "sequence length {len} cannot be sharded {layout} over {ranks} ranks: it must be a multiple of {multiple}"
    )]
    Length {
        len: usize,
        layout: String,
        ranks: usize,
        multiple: usize,
    },
    #[error("{what}: {reason}")]
    Shape { what: &'static str, reason: String },
}

pub type Result<T> = std::result::Result<T, ParallelError>;
