//! Ring attention (context parallelism over P ranks), forward and backward, plain or
//! zigzag load-balanced for causal masks. docs/algorithms.md section 2; the structure
//! of zhuzilin/ring-flash-attention, written from the algorithm.
//!
//! Forward: at step `s` rank `r` holds the K/V block of rank `(r - s) mod P` and
//! merges that block's partial (O, LSE) into its own. The K/V block for step `s + 1`
//! is posted to the next rank before step `s` is computed, so on an asynchronous
//! backend the transfer overlaps the compute.
//!
//! Backward: dQ accumulates locally; dK/dV (f32) travel with their K/V block on a
//! second ring, collecting each rank's contribution, and arrive home after P hops.
//!
//! Zigzag (rank `r` holds chunks `r` and `2P-1-r` of `2P`, [`SeqLayout::Zigzag`]):
//! step 0 is causal attention over the local pair; a block from an earlier rank is
//! seen whole by all local queries through its first half only; a block from a later
//! rank is seen whole by the second half of the local queries only. Every
//! off-diagonal step costs half a block, on every rank.
//!
//! [`SeqLayout::Zigzag`]: crate::layout::SeqLayout::Zigzag

use burn::tensor::{DType, Float, Int, Tensor};
use longview_comm::{Communicator, Shift};

use crate::block::{self, Block};
use crate::{ParallelError, Result};

/// How a causal sequence is spread over the ring (non-causal attention ignores it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingBalance {
    /// Contiguous shards ([`crate::layout::SeqLayout::Contiguous`]): rank `P-1` does P
    /// blocks of work, rank 0 one.
    Plain,
    /// Zigzag shards ([`crate::layout::SeqLayout::Zigzag`]): equal work on every rank.
    Zigzag,
}

/// Ring attention settings; the same on every rank.
#[derive(Debug, Clone, Copy)]
pub struct RingAttention {
    pub balance: RingBalance,
    pub causal: bool,
    /// Multiplies `q k^T`; usually `1 / sqrt(head_dim)`.
    pub scale: f64,
}

/// What one ring step computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    /// The block lies wholly in the future of every local query.
    Skip,
    /// All local queries against all received keys.
    Whole { causal: bool },
    /// All local queries against the first half of the received keys, unmasked.
    KeysFirstHalf,
    /// The second half of the local queries against all received keys, unmasked.
    QueriesSecondHalf,
}

impl RingAttention {
    fn part(&self, step: usize, source: usize, rank: usize) -> Part {
        if step == 0 {
            return Part::Whole {
                causal: self.causal,
            };
        }
        if !self.causal {
            return Part::Whole { causal: false };
        }
        match (self.balance, source < rank) {
            (RingBalance::Plain, true) => Part::Whole { causal: false },
            (RingBalance::Plain, false) => Part::Skip,
            (RingBalance::Zigzag, true) => Part::KeysFirstHalf,
            (RingBalance::Zigzag, false) => Part::QueriesSecondHalf,
        }
    }

    fn check(
        &self,
        q: &Tensor<4>,
        k: &Tensor<4>,
        segments: Option<&Tensor<2, Int>>,
    ) -> Result<usize> {
        let [b, hq, n, d] = q.dims();
        let [bk, hkv, nk, dk] = k.dims();
        if (b, n, d) != (bk, nk, dk) || hkv == 0 || hq % hkv != 0 {
            return Err(ParallelError::Shape {
                what: "ring attention",
                reason: format!(
                    "q is {:?} and k is {:?}: batch, local length and head dim must agree \
                     and kv heads must divide query heads",
                    q.dims(),
                    k.dims()
                ),
            });
        }
        if let Some(seg) = segments
            && seg.dims() != [b, n]
        {
            return Err(ParallelError::Shape {
                what: "ring attention",
                reason: format!(
                    "sequence ids are {:?}, expected [batch, local_len] = [{b}, {n}]",
                    seg.dims()
                ),
            });
        }
        if self.causal && self.balance == RingBalance::Zigzag && n % 2 != 0 {
            return Err(ParallelError::Shape {
                what: "zigzag ring attention",
                reason: format!("the local length {n} must be even (two chunks per rank)"),
            });
        }
        Ok(n / 2)
    }

    /// The block attention of one step and the first local query row it covers (its
    /// keys always start at the received block's first row); `None` when the step has
    /// nothing to compute.
    #[allow(clippy::too_many_arguments)]
    fn step_block(
        &self,
        part: Part,
        q: &Tensor<4>,
        k: &Tensor<4>,
        v: &Tensor<4>,
        q_segments: Option<&Tensor<2, Int>>,
        k_segments: Option<&Tensor<2, Int>>,
        half: usize,
    ) -> Option<(Block, usize)> {
        let n = q.dims()[2];
        let (causal, q_from, keys_first_half) = match part {
            Part::Skip => return None,
            Part::Whole { causal } => (causal, 0, false),
            Part::KeysFirstHalf => (false, 0, true),
            Part::QueriesSecondHalf => (false, half, false),
        };
        let k_len = if keys_first_half { half } else { n };
        let segments = q_segments.zip(k_segments).map(|(qs, ks)| {
            (
                qs.clone().narrow(1, q_from, n - q_from),
                ks.clone().narrow(1, 0, k_len),
            )
        });
        let block = Block {
            q: q.clone().narrow(2, q_from, n - q_from),
            k: k.clone().narrow(2, 0, k_len),
            v: v.clone().narrow(2, 0, k_len),
            causal,
            scale: self.scale,
            segments,
        };
        Some((block, q_from))
    }

    /// This rank's `(O, LSE)`: O in q's dtype `[batch, q_heads, local_len, head_dim]`,
    /// LSE in f32 `[batch, q_heads, local_len]`.
    ///
    /// # Shapes
    /// - `q`: `[batch, q_heads, local_len, head_dim]`, this rank's shard
    /// - `k`, `v`: `[batch, kv_heads, local_len, head_dim]`
    pub fn forward<C: Communicator>(
        &self,
        comm: &C,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
    ) -> Result<(Tensor<4>, Tensor<3>)> {
        self.forward_packed(comm, q, k, v, None)
    }

    /// [`RingAttention::forward`] for packed variable-length batches: `segments`
    /// (`[batch, local_len]`, this rank's shard, laid out like q) holds the sequence id
    /// of every token; tokens attend only within their own sequence.
    pub fn forward_packed<C: Communicator>(
        &self,
        comm: &C,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        segments: Option<Tensor<2, Int>>,
    ) -> Result<(Tensor<4>, Tensor<3>)> {
        let half = self.check(&q, &k, segments.as_ref())?;
        let (world, rank) = (comm.world_size(), comm.rank());
        let (next, prev) = ((rank + 1) % world, (rank + world - 1) % world);
        let dtype = q.dtype();
        let (mut k_cur, mut v_cur, mut seg_cur) = (k, v, segments.clone());
        let mut acc: Option<(Tensor<4>, Tensor<3>)> = None;
        for step in 0..world {
            // The next step's block is in flight while this one is computed.
            let incoming = if step + 1 < world {
                Some(Incoming::start(
                    comm,
                    &k_cur,
                    &v_cur,
                    seg_cur.as_ref(),
                    next,
                    prev,
                )?)
            } else {
                None
            };
            let part = self.part(step, (rank + world - step) % world, rank);
            let planned = self.step_block(
                part,
                &q,
                &k_cur,
                &v_cur,
                segments.as_ref(),
                seg_cur.as_ref(),
                half,
            );
            if let Some((block, q_from)) = planned {
                let partial = block::forward(&block);
                acc = Some(match acc {
                    None => partial,
                    Some((o, l)) if q_from > 0 => {
                        let rows = o.dims()[2] - q_from;
                        let (o2, l2) = block::merge(
                            (
                                o.clone().narrow(2, q_from, rows),
                                l.clone().narrow(2, q_from, rows),
                            ),
                            partial,
                        );
                        (
                            Tensor::cat(vec![o.narrow(2, 0, q_from), o2], 2),
                            Tensor::cat(vec![l.narrow(2, 0, q_from), l2], 2),
                        )
                    }
                    Some(acc) => block::merge(acc, partial),
                });
            }
            if let Some(incoming) = incoming {
                (k_cur, v_cur, seg_cur) = incoming.wait()?;
            }
        }
        let (o, lse) = acc.expect("step 0 always computes");
        Ok((o.cast(dtype), lse))
    }

    /// This rank's `(dQ, dK, dV)` in the dtypes of q, k, v, from the forward's O and LSE
    /// and the upstream gradient `d_o`; the attention forward is not recomputed.
    pub fn backward<C: Communicator>(
        &self,
        comm: &C,
        qkv: (Tensor<4>, Tensor<4>, Tensor<4>),
        o: Tensor<4>,
        lse: Tensor<3>,
        d_o: Tensor<4>,
    ) -> Result<(Tensor<4>, Tensor<4>, Tensor<4>)> {
        self.backward_packed(comm, qkv, o, lse, d_o, None)
    }

    /// [`RingAttention::backward`] for packed batches (`segments` as in
    /// [`RingAttention::forward_packed`]).
    pub fn backward_packed<C: Communicator>(
        &self,
        comm: &C,
        qkv: (Tensor<4>, Tensor<4>, Tensor<4>),
        o: Tensor<4>,
        lse: Tensor<3>,
        d_o: Tensor<4>,
        segments: Option<Tensor<2, Int>>,
    ) -> Result<(Tensor<4>, Tensor<4>, Tensor<4>)> {
        let delta = block::delta(o, d_o.clone());
        self.backward_with_delta(comm, qkv, lse, delta, d_o, segments)
    }

    /// The backward with `delta = rowsum(dO * O)` already computed (the Ulysses layers
    /// compute it before their all-to-all instead of moving O).
    pub(crate) fn backward_with_delta<C: Communicator>(
        &self,
        comm: &C,
        (q, k, v): (Tensor<4>, Tensor<4>, Tensor<4>),
        lse: Tensor<3>,
        delta: Tensor<3>,
        d_o: Tensor<4>,
        segments: Option<Tensor<2, Int>>,
    ) -> Result<(Tensor<4>, Tensor<4>, Tensor<4>)> {
        let half = self.check(&q, &k, segments.as_ref())?;
        let (world, rank) = (comm.world_size(), comm.rank());
        let (next, prev) = ((rank + 1) % world, (rank + world - 1) % world);
        let device = q.device();
        let dtypes = (q.dtype(), k.dtype(), v.dtype());
        let mut d_q = Tensor::<4>::zeros(q.dims(), (&device, DType::F32));
        let (k_dims, v_dims) = (k.dims(), v.dims());
        let (mut k_cur, mut v_cur, mut seg_cur) = (k, v, segments.clone());
        // The dK/dV accumulated by the previous ranks for the block this rank holds
        // next, in flight while this step computes: a rank adds its share to a block's
        // gradients and passes them on, and they reach the block's owner after P hops.
        let mut accumulated: Option<(Shift<'_, 4, Float>, Shift<'_, 4, Float>)> = None;
        for step in 0..world {
            // The next step's block is in flight while this one is computed.
            let incoming = if step + 1 < world {
                Some(Incoming::start(
                    comm,
                    &k_cur,
                    &v_cur,
                    seg_cur.as_ref(),
                    next,
                    prev,
                )?)
            } else {
                None
            };
            let part = self.part(step, (rank + world - step) % world, rank);
            let planned = self.step_block(
                part,
                &q,
                &k_cur,
                &v_cur,
                segments.as_ref(),
                seg_cur.as_ref(),
                half,
            );
            let own = planned.map(|(block, q_from)| {
                let rows = q.dims()[2] - q_from;
                let (dq, dk, dv) = block::backward(
                    &block,
                    lse.clone().narrow(2, q_from, rows),
                    delta.clone().narrow(2, q_from, rows),
                    d_o.clone().narrow(2, q_from, rows),
                );
                d_q = add_rows(d_q.clone(), dq, q_from);
                (dk, dv)
            });
            // The block's gradients from the ranks before (they arrived while this step
            // computed; waited first, as they were sent first), plus this rank's share.
            let (mut d_k, mut d_v) = match accumulated.take() {
                Some((d_k, d_v)) => (d_k.wait()?, d_v.wait()?),
                None => (
                    Tensor::<4>::zeros(k_dims, (&device, DType::F32)),
                    Tensor::<4>::zeros(v_dims, (&device, DType::F32)),
                ),
            };
            if let Some((dk, dv)) = own {
                d_k = add_rows(d_k, dk, 0);
                d_v = add_rows(d_v, dv, 0);
            }
            if let Some(incoming) = incoming {
                (k_cur, v_cur, seg_cur) = incoming.wait()?;
            }
            if world == 1 {
                return Ok((d_q.cast(dtypes.0), d_k.cast(dtypes.1), d_v.cast(dtypes.2)));
            }
            // Passed on now, waited for at the end of the next step's compute.
            accumulated = Some((
                comm.start_shift(&d_k, next, prev)?,
                comm.start_shift(&d_v, next, prev)?,
            ));
        }
        // After P hops every block's gradients are home.
        let (d_k, d_v) = accumulated.expect("world > 1 shifts every step");
        let (d_k, d_v) = (d_k.wait()?, d_v.wait()?);
        Ok((d_q.cast(dtypes.0), d_k.cast(dtypes.1), d_v.cast(dtypes.2)))
    }
}

/// A K/V block (and its sequence ids) on its way from the previous rank.
struct Incoming<'a> {
    k: Shift<'a, 4, Float>,
    v: Shift<'a, 4, Float>,
    segments: Option<Shift<'a, 2, Int>>,
}

type Received = (Tensor<4>, Tensor<4>, Option<Tensor<2, Int>>);

impl<'a> Incoming<'a> {
    fn start<C: Communicator>(
        comm: &'a C,
        k: &Tensor<4>,
        v: &Tensor<4>,
        segments: Option<&Tensor<2, Int>>,
        next: usize,
        prev: usize,
    ) -> Result<Self> {
        Ok(Incoming {
            k: comm.start_shift(k, next, prev)?,
            v: comm.start_shift(v, next, prev)?,
            segments: segments
                .map(|s| comm.start_shift(s, next, prev))
                .transpose()?,
        })
    }

    fn wait(self) -> Result<Received> {
        Ok((
            self.k.wait()?,
            self.v.wait()?,
            self.segments.map(Shift::wait).transpose()?,
        ))
    }
}

/// `acc` with `part` added to its rows `from..from + part_len` (sequence dim 2).
fn add_rows(acc: Tensor<4>, part: Tensor<4>, from: usize) -> Tensor<4> {
    let len = part.dims()[2];
    let total = acc.dims()[2];
    let mut pieces = Vec::with_capacity(3);
    if from > 0 {
        pieces.push(acc.clone().narrow(2, 0, from));
    }
    pieces.push(acc.clone().narrow(2, from, len) + part);
    if from + len < total {
        pieces.push(acc.narrow(2, from + len, total - from - len));
    }
    Tensor::cat(pieces, 2)
}
