//! Ulysses (all-to-all) attention: each rank trades its sequence shard of all heads
//! for the whole sequence of `heads / P` heads, attends locally, and trades back.
//! docs/algorithms.md section 3 (DeepSpeed-Ulysses; USP's GQA handling).
//!
//! The backward of an all-to-all is the inverse all-to-all. With more ranks than kv
//! heads each kv head is replicated `P / kv_heads` times before the exchange and the
//! replicas' gradients are summed after it.

use burn::tensor::{Int, Tensor};
use longview_comm::Communicator;

use crate::block::{self, Block};
use crate::layout::{SeqLayout, shard, unshard};
use crate::{ParallelError, Result};

/// Checks that `degree` ranks can split `q_heads` query heads and `kv_heads` kv heads;
/// the error states the rule that failed.
pub fn check_heads(q_heads: usize, kv_heads: usize, degree: usize) -> Result<()> {
    let fail = |rule| {
        Err(ParallelError::Heads {
            q_heads,
            kv_heads,
            degree,
            rule,
        })
    };
    if degree == 0 || kv_heads == 0 || !q_heads.is_multiple_of(kv_heads) {
        return fail("degree >= 1 and kv heads dividing query heads");
    }
    if !q_heads.is_multiple_of(degree) {
        return fail("query heads % degree != 0");
    }
    if degree <= kv_heads && !kv_heads.is_multiple_of(degree) {
        return fail("degree <= kv heads but kv heads % degree != 0");
    }
    if degree > kv_heads && !degree.is_multiple_of(kv_heads) {
        return fail("degree > kv heads but degree % kv heads != 0");
    }
    Ok(())
}

/// How many copies of each kv head the exchange sends (1 unless `degree > kv_heads`).
fn kv_replicas(kv_heads: usize, degree: usize) -> usize {
    if degree > kv_heads {
        degree / kv_heads
    } else {
        1
    }
}

/// `[B, H, n, ...]` sequence shards (laid out by `layout` over the group) ->
/// `[B, H / P, n * P, ...]`, the whole sequence in global order for this rank's heads.
pub fn sequence_to_heads<C: Communicator, const D: usize>(
    comm: &C,
    x: Tensor<D>,
    layout: SeqLayout,
) -> Result<Tensor<D>> {
    let parts = x.chunk(comm.world_size(), 1);
    let received = comm.all_to_all(parts)?;
    unshard(received, 2, layout)
}

/// The inverse of [`sequence_to_heads`].
pub fn heads_to_sequence<C: Communicator, const D: usize>(
    comm: &C,
    x: Tensor<D>,
    layout: SeqLayout,
) -> Result<Tensor<D>> {
    let world = comm.world_size();
    let parts = (0..world)
        .map(|r| shard(x.clone(), 2, layout, r, world))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(comm.all_to_all(parts)?, 1))
}

/// The whole `[batch, len]` sequence-id tensor from every rank's `[batch, local_len]`
/// shard (for packed batches: the ids are per token, not per head).
pub fn gather_sequence<C: Communicator>(
    comm: &C,
    x: Tensor<2, Int>,
    layout: SeqLayout,
) -> Result<Tensor<2, Int>> {
    let gathered = comm.all_gather(x, 1)?;
    unshard(gathered.chunk(comm.world_size(), 1), 1, layout)
}

/// Ulysses attention settings; the same on every rank.
#[derive(Debug, Clone, Copy)]
pub struct UlyssesAttention {
    /// How the group's ranks hold the sequence ([`SeqLayout::Contiguous`] or
    /// [`SeqLayout::Zigzag`]); the exchange restores global order either way.
    pub layout: SeqLayout,
    pub causal: bool,
    pub scale: f64,
}

/// Per-head-shard work inside a Ulysses exchange: plain attention for
/// [`UlyssesAttention`], a zigzag ring for 2D attention.
pub(crate) trait HeadShardAttention {
    /// `segments`: the sequence ids of the gathered tokens (packed batches).
    fn forward(
        &self,
        qkv: (Tensor<4>, Tensor<4>, Tensor<4>),
        segments: Option<Tensor<2, Int>>,
    ) -> Result<(Tensor<4>, Tensor<3>)>;
    fn backward(
        &self,
        qkv: (Tensor<4>, Tensor<4>, Tensor<4>),
        lse: Tensor<3>,
        delta: Tensor<3>,
        d_o: Tensor<4>,
        segments: Option<Tensor<2, Int>>,
    ) -> Result<(Tensor<4>, Tensor<4>, Tensor<4>)>;
}

struct Local {
    causal: bool,
    scale: f64,
}

impl HeadShardAttention for Local {
    fn forward(
        &self,
        (q, k, v): (Tensor<4>, Tensor<4>, Tensor<4>),
        segments: Option<Tensor<2, Int>>,
    ) -> Result<(Tensor<4>, Tensor<3>)> {
        Ok(block::forward(&Block {
            q,
            k,
            v,
            causal: self.causal,
            scale: self.scale,
            segments: segments.map(|s| (s.clone(), s)),
        }))
    }

    fn backward(
        &self,
        (q, k, v): (Tensor<4>, Tensor<4>, Tensor<4>),
        lse: Tensor<3>,
        delta: Tensor<3>,
        d_o: Tensor<4>,
        segments: Option<Tensor<2, Int>>,
    ) -> Result<(Tensor<4>, Tensor<4>, Tensor<4>)> {
        let block = Block {
            q,
            k,
            v,
            causal: self.causal,
            scale: self.scale,
            segments: segments.map(|s| (s.clone(), s)),
        };
        Ok(block::backward(&block, lse, delta, d_o))
    }
}

pub(crate) fn forward_with<C: Communicator>(
    comm: &C,
    layout: SeqLayout,
    inner: &impl HeadShardAttention,
    (q, k, v): (Tensor<4>, Tensor<4>, Tensor<4>),
    segments: Option<Tensor<2, Int>>,
) -> Result<(Tensor<4>, Tensor<3>)> {
    let [_, q_heads, _, _] = q.dims();
    let kv_heads = k.dims()[1];
    let degree = comm.world_size();
    check_heads(q_heads, kv_heads, degree)?;
    let copies = kv_replicas(kv_heads, degree);
    let dtype = q.dtype();
    let q = sequence_to_heads(comm, q, layout)?;
    let k = sequence_to_heads(comm, block::expand_heads(k, copies), layout)?;
    let v = sequence_to_heads(comm, block::expand_heads(v, copies), layout)?;
    let segments = segments
        .map(|s| gather_sequence(comm, s, layout))
        .transpose()?;
    let (o, lse) = inner.forward((q, k, v), segments)?;
    Ok((
        heads_to_sequence(comm, o.cast(dtype), layout)?,
        heads_to_sequence(comm, lse, layout)?,
    ))
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_with<C: Communicator>(
    comm: &C,
    layout: SeqLayout,
    inner: &impl HeadShardAttention,
    (q, k, v): (Tensor<4>, Tensor<4>, Tensor<4>),
    o: Tensor<4>,
    lse: Tensor<3>,
    d_o: Tensor<4>,
    segments: Option<Tensor<2, Int>>,
) -> Result<(Tensor<4>, Tensor<4>, Tensor<4>)> {
    let [_, q_heads, _, _] = q.dims();
    let kv_heads = k.dims()[1];
    let degree = comm.world_size();
    check_heads(q_heads, kv_heads, degree)?;
    let copies = kv_replicas(kv_heads, degree);
    // D = rowsum(dO * O) is per (head, token): computed before the exchange, it moves
    // instead of O.
    let delta = sequence_to_heads(comm, block::delta(o, d_o.clone()), layout)?;
    let lse = sequence_to_heads(comm, lse, layout)?;
    let d_o = sequence_to_heads(comm, d_o, layout)?;
    let q = sequence_to_heads(comm, q, layout)?;
    let k = sequence_to_heads(comm, block::expand_heads(k, copies), layout)?;
    let v = sequence_to_heads(comm, block::expand_heads(v, copies), layout)?;
    let segments = segments
        .map(|s| gather_sequence(comm, s, layout))
        .transpose()?;
    let (d_q, d_k, d_v) = inner.backward((q, k, v), lse, delta, d_o, segments)?;
    Ok((
        heads_to_sequence(comm, d_q, layout)?,
        block::sum_heads(heads_to_sequence(comm, d_k, layout)?, copies),
        block::sum_heads(heads_to_sequence(comm, d_v, layout)?, copies),
    ))
}

impl UlyssesAttention {
    /// This rank's `(O, LSE)` for its sequence shard (O in q's dtype, LSE f32).
    ///
    /// # Shapes
    /// - `q`: `[batch, q_heads, local_len, head_dim]`
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

    /// [`UlyssesAttention::forward`] for packed batches: `segments` (`[batch,
    /// local_len]`, this rank's shard) holds each token's sequence id.
    pub fn forward_packed<C: Communicator>(
        &self,
        comm: &C,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        segments: Option<Tensor<2, Int>>,
    ) -> Result<(Tensor<4>, Tensor<3>)> {
        let inner = Local {
            causal: self.causal,
            scale: self.scale,
        };
        forward_with(comm, self.layout, &inner, (q, k, v), segments)
    }

    /// This rank's `(dQ, dK, dV)` from the forward's O and LSE and the gradient `d_o`.
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

    /// [`UlyssesAttention::backward`] for packed batches.
    pub fn backward_packed<C: Communicator>(
        &self,
        comm: &C,
        qkv: (Tensor<4>, Tensor<4>, Tensor<4>),
        o: Tensor<4>,
        lse: Tensor<3>,
        d_o: Tensor<4>,
        segments: Option<Tensor<2, Int>>,
    ) -> Result<(Tensor<4>, Tensor<4>, Tensor<4>)> {
        let inner = Local {
            causal: self.causal,
            scale: self.scale,
        };
        let (d_q, d_k, d_v) = backward_with(
            comm,
            self.layout,
            &inner,
            qkv.clone(),
            o,
            lse,
            d_o,
            segments,
        )?;
        Ok((
            d_q.cast(qkv.0.dtype()),
            d_k.cast(qkv.1.dtype()),
            d_v.cast(qkv.2.dtype()),
        ))
    }
}
