//! Plugs a sequence-parallel scheme into the models' attention interface
//! (`longview_models::attention`): models configured with `AttentionImpl::Sharded`
//! call the scheme installed on their thread, as the rank's shard of the sequence.

use std::sync::Arc;

use burn::tensor::Tensor;
use longview_models::attention::{
    AttentionInput, AttentionMask, ShardedAttention, ShardedGuard, install_sharded_attention,
};

use crate::autodiff::{DistributedAttention, distributed_attention};

/// A scheme bound to its communicator, for the attention calls of one model.
struct ModelAttention {
    attention: Arc<dyn DistributedAttention>,
    causal: bool,
    scale: f64,
    what: String,
}

impl ModelAttention {
    /// The scheme was built for one mask and scale: a model calling it with others is
    /// mis-configured, and a wrong answer would be silent.
    fn check(&self, input: &AttentionInput) {
        let causal = input.mask == AttentionMask::Causal;
        assert!(
            causal == self.causal && (input.scale - self.scale).abs() <= 1e-12 * self.scale.abs(),
            "{}: installed for causal={} scale={}, but the model called it with causal={causal} \
             scale={}",
            self.what,
            self.causal,
            self.scale,
            input.scale
        );
    }
}

impl ShardedAttention for ModelAttention {
    fn attend(&self, input: AttentionInput) -> Tensor<4> {
        self.check(&input);
        let (o, _lse) = distributed_attention(self.attention.clone(), input.q, input.k, input.v)
            .unwrap_or_else(|e| panic!("{}: {e}", self.what));
        o
    }

    fn attend_with_lse(&self, input: AttentionInput) -> (Tensor<4>, Tensor<3>) {
        self.check(&input);
        let tracked = input.q.is_autodiff();
        let (o, lse) = self
            .attention
            .forward(input.q.inner(), input.k.inner(), input.v.inner())
            .unwrap_or_else(|e| panic!("{}: {e}", self.what));
        if tracked {
            (o.autodiff(), lse.autodiff())
        } else {
            (o, lse)
        }
    }

    fn input_grads(
        &self,
        input: AttentionInput,
        o: Tensor<4>,
        lse: Tensor<3>,
        d_o: Tensor<4>,
    ) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
        self.check(&input);
        let tracked = input.q.is_autodiff();
        let (d_q, d_k, d_v) = self
            .attention
            .backward(
                (input.q.inner(), input.k.inner(), input.v.inner()),
                o.inner(),
                lse.inner(),
                d_o.inner(),
            )
            .unwrap_or_else(|e| panic!("{} backward: {e}", self.what));
        if tracked {
            (d_q.autodiff(), d_k.autodiff(), d_v.autodiff())
        } else {
            (d_q, d_k, d_v)
        }
    }
}

/// Installs `attention` (built with `causal` and `scale`, e.g. causal and
/// `1/sqrt(head_dim)` for the LLM) for the models running on this thread, until the
/// guard is dropped. `what` names it in error messages (e.g. "zigzag ring, rank 3/8").
pub fn install(
    attention: Arc<dyn DistributedAttention>,
    causal: bool,
    scale: f64,
    what: impl Into<String>,
) -> ShardedGuard {
    install_sharded_attention(Arc::new(ModelAttention {
        attention,
        causal,
        scale,
        what: what.into(),
    }))
}
