//! The response rows' attention over their group's shared prompt without copying the
//! prompt's keys and values once per response (untracked forward, and the backward
//! that attention-aware recomputation runs from the kept O and LSE).
//!
//! The attention of a response row over `prompt keys ++ its own keys` is split in two
//! partial attentions merged by their log-sum-exps (docs/algorithms.md section 1):
//! 1. every response's queries folded into one sequence, `[1, q_heads, G x rows, d]`,
//!    against the prompt's keys once (full mask: every response row sees the whole
//!    prompt);
//! 2. each response against its own keys (causal, `[G, ...]`).
//!
//! The backward runs both parts from the FINAL (merged) O and LSE, as the ring
//! attention does for its blocks: with `delta = rowsum(dO * O)` of the final output,
//! each part's dQ, dK, dV are the exact gradients of the merged attention. The prompt
//! part's dK and dV come out already summed over the G responses.
//!
//! Before this, the G responses read a `[G, kv_heads, prompt + rows, d]` concatenation
//! of the prompt's K/V, G copies of it per layer (and its G-wide gradients in the
//! backward). The tracked paths (no recomputation, per-layer recomputation) still use
//! that concatenation: merging partial results under autodiff would need a gradient
//! through the LSE, which the flash op does not give.

use burn::tensor::Tensor;
use longview_models::attention::{
    AttentionImpl, AttentionInput, AttentionMask, attend_with_lse, attention_input_grads,
    merge_partials,
};
use longview_parallel::block::{self, Block};

/// The gradients of a split attention: the responses' queries and own keys/values
/// (`[G, ...]`), and the prompt's keys/values summed over the responses (`[1, ...]`).
pub(super) struct PrefixGrads {
    pub dq: Tensor<4>,
    pub dk_own: Tensor<4>,
    pub dv_own: Tensor<4>,
    pub dk_prompt: Tensor<4>,
    pub dv_prompt: Tensor<4>,
}

/// The one-device implementations the split runs on (the flash kernels, or the
/// tensor-op block attention in the reference's place).
pub(super) fn splits_at_prompt(implementation: AttentionImpl) -> bool {
    matches!(
        implementation,
        AttentionImpl::Flash | AttentionImpl::Reference
    )
}

/// `[G, H, rows, d]` -> `[1, H, G x rows, d]` (response-major within each head).
fn fold(x: Tensor<4>) -> Tensor<4> {
    let [g, h, rows, d] = x.dims();
    x.swap_dims(0, 1).reshape([1, h, g * rows, d])
}

fn unfold(x: Tensor<4>, g: usize) -> Tensor<4> {
    let [_, h, rows, d] = x.dims();
    x.reshape([h, g, rows / g, d]).swap_dims(0, 1)
}

fn fold_rows(x: Tensor<3>) -> Tensor<3> {
    let [g, h, rows] = x.dims();
    x.swap_dims(0, 1).reshape([1, h, g * rows])
}

fn unfold_rows(x: Tensor<3>, g: usize) -> Tensor<3> {
    let [_, h, rows] = x.dims();
    x.reshape([h, g, rows / g]).swap_dims(0, 1)
}

/// The folded responses' queries against the prompt's keys and values.
fn prompt_part(prompt: &AttentionInput, own: &AttentionInput) -> AttentionInput {
    AttentionInput {
        q: fold(own.q.clone()),
        k: prompt.k.clone(),
        v: prompt.v.clone(),
        mask: AttentionMask::Full,
        scale: own.scale,
    }
}

fn as_block(input: &AttentionInput) -> Block {
    Block {
        q: input.q.clone(),
        k: input.k.clone(),
        v: input.v.clone(),
        causal: input.mask == AttentionMask::Causal,
        scale: input.scale,
        segments: None,
    }
}

/// One part's output (q's dtype from the flash kernels, f32 from the tensor ops) and
/// LSE: the flash kernels where the layer runs them, the tensor-op block attention
/// otherwise (the reference materialises its scores anyway).
fn part_forward(implementation: AttentionImpl, input: AttentionInput) -> (Tensor<4>, Tensor<3>) {
    match implementation {
        AttentionImpl::Flash => {
            let (o, lse) = attend_with_lse(implementation, input);
            (o, lse.expect("the flash kernels return an LSE"))
        }
        _ => block::forward(&as_block(&input)),
    }
}

/// One part's dQ, dK, dV from the final output `o`, its LSE and `d_o`.
fn part_grads(
    implementation: AttentionImpl,
    input: AttentionInput,
    o: Tensor<4>,
    lse: Tensor<3>,
    d_o: Tensor<4>,
) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
    match implementation {
        // `attention_input_grads` takes delta from the `o` it is given: the final one.
        AttentionImpl::Flash => attention_input_grads(implementation, input, o, Some(lse), d_o),
        _ => {
            let block = as_block(&input);
            let block = Block {
                q: block.q.detach(),
                k: block.k.detach(),
                v: block.v.detach(),
                ..block
            };
            let delta = block::delta(o, d_o.clone());
            block::backward(&block, lse, delta, d_o)
        }
    }
}

/// The responses' attention output (q's dtype) and LSE over the prompt's keys and
/// values followed by their own (causal, queries aligned to the end of the keys).
/// Untracked inputs only (see the module's note).
pub(super) fn attend_over_prefix(
    implementation: AttentionImpl,
    prompt: &AttentionInput,
    own: AttentionInput,
) -> (Tensor<4>, Tensor<3>) {
    let g = own.q.dims()[0];
    let dtype = own.q.dtype();
    let (o_prompt, lse_prompt) = part_forward(implementation, prompt_part(prompt, &own));
    let over_prompt = (unfold(o_prompt, g), unfold_rows(lse_prompt, g));
    let own = AttentionInput {
        mask: AttentionMask::Causal,
        ..own
    };
    let (o, lse) = merge_partials(over_prompt, part_forward(implementation, own));
    (o.cast(dtype), lse)
}

/// The gradients of [`attend_over_prefix`] given its output `o`, LSE and `d_o`.
pub(super) fn prefix_input_grads(
    implementation: AttentionImpl,
    prompt: &AttentionInput,
    own: AttentionInput,
    o: Tensor<4>,
    lse: Tensor<3>,
    d_o: Tensor<4>,
) -> PrefixGrads {
    let g = own.q.dims()[0];
    let (dq_prompt, dk_prompt, dv_prompt) = part_grads(
        implementation,
        prompt_part(prompt, &own),
        fold(o.clone()),
        fold_rows(lse.clone()),
        fold(d_o.clone()),
    );
    let own = AttentionInput {
        mask: AttentionMask::Causal,
        ..own
    };
    let (dq_own, dk_own, dv_own) = part_grads(implementation, own, o, lse, d_o);
    PrefixGrads {
        dq: unfold(dq_prompt, g).cast(dq_own.dtype()) + dq_own,
        dk_own,
        dv_own,
        dk_prompt,
        dv_prompt,
    }
}
