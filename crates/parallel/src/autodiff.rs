//! Any sequence-parallel attention as one Burn autodiff op (LightSeq's
//! rematerialization-aware checkpointing, docs/algorithms.md section 6: the op keeps
//! O and LSE, and its backward calls the scheme's distributed backward; the
//! communication-heavy attention forward never runs twice).
//!
//! The scheme runs outside the autodiff graph on the inner backend's tensors; the op
//! records one node with q, k, v as parents. LSE is returned for callers that merge
//! partial results, untracked (no gradient flows through it).

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{
    BalancedCheckpointing, CheckpointStrategy, NoCheckpointing,
};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{
    Autodiff, AutodiffBackend, Backend, DispatchKindConversion, DispatchTensor, Flex,
    tensor::FloatTensor,
};
use burn::tensor::Tensor;
use longview_comm::Communicator;

use crate::ring::RingAttention;
use crate::two_d::{TwoDAttention, TwoDGroups};
use crate::ulysses::UlyssesAttention;
use crate::{ParallelError, Result};

/// A sequence-parallel attention bound to its communicator(s): what the autodiff op
/// calls. Implemented for [`WithComm`] of each scheme.
pub trait DistributedAttention: Send + Sync {
    /// This rank's `(O, LSE)`.
    fn forward(&self, q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Result<(Tensor<4>, Tensor<3>)>;
    /// This rank's `(dQ, dK, dV)` from the stored O and LSE.
    fn backward(
        &self,
        qkv: (Tensor<4>, Tensor<4>, Tensor<4>),
        o: Tensor<4>,
        lse: Tensor<3>,
        d_o: Tensor<4>,
    ) -> Result<(Tensor<4>, Tensor<4>, Tensor<4>)>;
}

/// A sequence-parallel scheme run over communicator(s) `G` (a [`Communicator`] for
/// the ring and Ulysses, [`TwoDGroups`] for 2D): what [`WithComm`] binds.
pub trait SequenceScheme<G>: Send + Sync {
    /// This rank's `(O, LSE)`.
    fn forward(
        &self,
        comm: &G,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
    ) -> Result<(Tensor<4>, Tensor<3>)>;
    /// This rank's `(dQ, dK, dV)` from the stored O and LSE.
    fn backward(
        &self,
        comm: &G,
        qkv: (Tensor<4>, Tensor<4>, Tensor<4>),
        o: Tensor<4>,
        lse: Tensor<3>,
        d_o: Tensor<4>,
    ) -> Result<(Tensor<4>, Tensor<4>, Tensor<4>)>;
}

impl<C: Communicator + Sync> SequenceScheme<C> for RingAttention {
    fn forward(
        &self,
        comm: &C,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
    ) -> Result<(Tensor<4>, Tensor<3>)> {
        RingAttention::forward(self, comm, q, k, v)
    }
    fn backward(
        &self,
        comm: &C,
        qkv: (Tensor<4>, Tensor<4>, Tensor<4>),
        o: Tensor<4>,
        lse: Tensor<3>,
        d_o: Tensor<4>,
    ) -> Result<(Tensor<4>, Tensor<4>, Tensor<4>)> {
        RingAttention::backward(self, comm, qkv, o, lse, d_o)
    }
}

impl<C: Communicator + Sync> SequenceScheme<C> for UlyssesAttention {
    fn forward(
        &self,
        comm: &C,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
    ) -> Result<(Tensor<4>, Tensor<3>)> {
        UlyssesAttention::forward(self, comm, q, k, v)
    }
    fn backward(
        &self,
        comm: &C,
        qkv: (Tensor<4>, Tensor<4>, Tensor<4>),
        o: Tensor<4>,
        lse: Tensor<3>,
        d_o: Tensor<4>,
    ) -> Result<(Tensor<4>, Tensor<4>, Tensor<4>)> {
        UlyssesAttention::backward(self, comm, qkv, o, lse, d_o)
    }
}

impl<C: Communicator + Sync> SequenceScheme<TwoDGroups<C>> for TwoDAttention {
    fn forward(
        &self,
        comm: &TwoDGroups<C>,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
    ) -> Result<(Tensor<4>, Tensor<3>)> {
        TwoDAttention::forward(self, comm, q, k, v)
    }
    fn backward(
        &self,
        comm: &TwoDGroups<C>,
        qkv: (Tensor<4>, Tensor<4>, Tensor<4>),
        o: Tensor<4>,
        lse: Tensor<3>,
        d_o: Tensor<4>,
    ) -> Result<(Tensor<4>, Tensor<4>, Tensor<4>)> {
        TwoDAttention::backward(self, comm, qkv, o, lse, d_o)
    }
}

/// A scheme and the communicator (or 2D groups) it runs over.
pub struct WithComm<G, A> {
    pub comm: G,
    pub attention: A,
}

impl<G: Send + Sync, A: SequenceScheme<G>> DistributedAttention for WithComm<G, A> {
    fn forward(&self, q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Result<(Tensor<4>, Tensor<3>)> {
        self.attention.forward(&self.comm, q, k, v)
    }
    fn backward(
        &self,
        qkv: (Tensor<4>, Tensor<4>, Tensor<4>),
        o: Tensor<4>,
        lse: Tensor<3>,
        d_o: Tensor<4>,
    ) -> Result<(Tensor<4>, Tensor<4>, Tensor<4>)> {
        self.attention.backward(&self.comm, qkv, o, lse, d_o)
    }
}

#[derive(Clone)]
struct Scheme(Arc<dyn DistributedAttention>);

impl std::fmt::Debug for Scheme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DistributedAttention")
    }
}

#[derive(Debug)]
struct DistributedBackward;

impl<B: Backend> Backward<B, 3> for DistributedBackward
where
    DispatchTensor: DispatchKindConversion<B>,
{
    type State = (
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        Scheme,
    );

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_q, node_k, node_v] = ops.parents;
        let d_o = grads.consume::<B>(&ops.node);
        let (q, k, v, o, lse, scheme) = ops.state;
        let t = Tensor::<4>::from_primitive::<B>;
        // Autodiff backward passes cannot return errors: a failed collective (a peer
        // died, a timeout) ends this rank, which its peers then see as a departure.
        let (d_q, d_k, d_v) = scheme
            .0
            .backward(
                (t(q), t(k), t(v)),
                t(o),
                Tensor::<3>::from_primitive::<B>(lse),
                t(d_o),
            )
            .unwrap_or_else(|e| panic!("sequence-parallel attention backward failed: {e}"));
        for (node, grad) in [(node_q, d_q), (node_k, d_k), (node_v, d_v)] {
            if let Some(node) = node {
                let grad = grad
                    .try_into_primitive::<B>()
                    .expect("gradients live on the inputs' backend");
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

/// Runs `attention` on this rank's shard; on an autodiff device the result is tracked
/// and its backward is the scheme's distributed backward.
///
/// # Shapes
/// - `q`: `[batch, q_heads, local_len, head_dim]`; `k`, `v`:
///   `[batch, kv_heads, local_len, head_dim]`
/// - output: O `[batch, q_heads, local_len, head_dim]` (tracked), LSE
///   `[batch, q_heads, local_len]` f32 (not tracked)
pub fn distributed_attention(
    attention: Arc<dyn DistributedAttention>,
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
) -> Result<(Tensor<4>, Tensor<3>)> {
    if !q.is_autodiff() {
        return attention.forward(q, k, v);
    }
    // The autodiff wrapper's type names the inner backend and the checkpointing
    // strategy: try the ones this build has.
    let attempts = [
        tracked::<Flex, NoCheckpointing>,
        tracked::<Flex, BalancedCheckpointing>,
        #[cfg(feature = "cuda")]
        tracked::<burn::backend::Cube, NoCheckpointing>,
        #[cfg(feature = "cuda")]
        tracked::<burn::backend::Cube, BalancedCheckpointing>,
    ];
    for attempt in attempts {
        if let Some(result) = attempt(&attention, &q, &k, &v) {
            return result;
        }
    }
    Err(ParallelError::Shape {
        what: "sequence-parallel attention",
        reason: format!(
            "autodiff through the sequence-parallel op is built for the CPU (flex) backend \
             and, with the `cuda` feature, Burn's CubeCL CUDA backend; these tensors are on {:?}",
            q.device()
        ),
    })
}

fn tracked<B, C>(
    attention: &Arc<dyn DistributedAttention>,
    q: &Tensor<4>,
    k: &Tensor<4>,
    v: &Tensor<4>,
) -> Option<Result<(Tensor<4>, Tensor<3>)>>
where
    B: Backend,
    C: CheckpointStrategy,
    DispatchTensor: DispatchKindConversion<Autodiff<B, C>> + DispatchKindConversion<B>,
{
    let q = q.clone().try_into_primitive::<Autodiff<B, C>>().ok()?;
    let k = k.clone().try_into_primitive::<Autodiff<B, C>>().ok()?;
    let v = v.clone().try_into_primitive::<Autodiff<B, C>>().ok()?;
    let prep = DistributedBackward
        .prepare::<C>([q.node(), k.node(), v.node()])
        .compute_bound()
        .stateful();
    let (q, k, v) = (q.into_primitive(), k.into_primitive(), v.into_primitive());
    let t = Tensor::<4>::from_primitive::<B>;
    let (o, lse) = match attention.forward(t(q.clone()), t(k.clone()), t(v.clone())) {
        Ok(out) => out,
        Err(e) => return Some(Err(e)),
    };
    let o = o
        .try_into_primitive::<B>()
        .expect("outputs live on the inputs' backend");
    let lse = lse
        .try_into_primitive::<B>()
        .expect("outputs live on the inputs' backend");
    let o = match prep {
        OpsKind::Tracked(prep) => {
            let state = (q, k, v, o.clone(), lse.clone(), Scheme(attention.clone()));
            prep.finish(state, o)
        }
        OpsKind::UnTracked(prep) => prep.finish(o),
    };
    let lse = <Autodiff<B, C> as AutodiffBackend>::from_inner(lse);
    Some(Ok((
        Tensor::from_primitive::<Autodiff<B, C>>(o),
        Tensor::from_primitive::<Autodiff<B, C>>(lse),
    )))
}
