//! Attention over one (query block, key block) pair, returning the softmax statistics
//! that let partial results be merged (FlashAttention-2's forward/backward with LSE,
//! docs/algorithms.md section 1), and the merge itself (from `longview_models::attention`).
//!
//! These are plain tensor ops with f32 statistics and accumulation whatever the input
//! dtype; they materialise one `[B, Hq, Sq, Sk]` block of scores, which is what the
//! CPU runs and the equivalence tests need. With the `flash` feature, f16/bf16 blocks
//! on a CubeCL device (CUDA) go to the flash kernels of `longview-kernels` instead
//! (same O and LSE, gradients from the final LSE and delta, no score block); packed
//! sequences and f32 inputs keep the tensor ops.

use burn::tensor::{Bool, DType, Int, Tensor};

/// Inputs of one block attention.
///
/// # Shapes
/// - `q`: `[batch, q_heads, q_len, head_dim]`
/// - `k`, `v`: `[batch, kv_heads, kv_len, head_dim]`, `kv_heads` dividing `q_heads`
///   (query head `h` reads kv head `h / (q_heads / kv_heads)`).
#[derive(Debug, Clone)]
pub struct Block {
    pub q: Tensor<4>,
    pub k: Tensor<4>,
    pub v: Tensor<4>,
    /// Query `i` sees key `j` when `j <= i + kv_len - q_len` (the blocks end at the same
    /// position); every key otherwise. Causal blocks need `q_len <= kv_len`.
    pub causal: bool,
    pub scale: f64,
    /// Packed variable-length batches: the sequence (document) id of every query and
    /// every key, `[batch, q_len]` and `[batch, kv_len]`; a query sees only keys of its
    /// own sequence. Rows that see no key of the block get O = 0 and LSE = -inf.
    pub segments: Option<(Tensor<2, Int>, Tensor<2, Int>)>,
}

/// Repeats each kv head `groups` times (`[B, H, S, D]` -> `[B, H * groups, S, D]`).
pub(crate) fn expand_heads(x: Tensor<4>, groups: usize) -> Tensor<4> {
    if groups == 1 {
        return x;
    }
    let [b, h, s, d] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, h, groups, s, d])
        .reshape([b, h * groups, s, d])
}

/// Sums the gradients of the `groups` query heads that share each kv head
/// (`[B, H * groups, S, D]` -> `[B, H, S, D]`).
pub(crate) fn sum_heads(x: Tensor<4>, groups: usize) -> Tensor<4> {
    if groups == 1 {
        return x;
    }
    let [b, h, s, d] = x.dims();
    x.reshape([b, h / groups, groups, s, d])
        .sum_dim(2)
        .reshape([b, h / groups, s, d])
}

fn scores(block: &Block) -> (Tensor<4>, usize) {
    let [b, hq, sq, _] = block.q.dims();
    let [_, hkv, sk, _] = block.k.dims();
    assert!(
        hkv > 0 && hq % hkv == 0,
        "block attention: kv heads ({hkv}) must divide query heads ({hq})"
    );
    let groups = hq / hkv;
    let q = block.q.clone().cast(DType::F32);
    let k = expand_heads(block.k.clone().cast(DType::F32), groups);
    let s = q.matmul(k.swap_dims(2, 3)).mul_scalar(block.scale);
    let s = if block.causal {
        assert!(
            sq <= sk,
            "causal block attention needs q_len ({sq}) <= kv_len ({sk})"
        );
        let offset = sk as i64 - sq as i64;
        let blocked = Tensor::<2, Bool>::tril_mask([sq, sk], offset, &s.device())
            .unsqueeze_dims::<4>(&[0, 1])
            .expand([b, hq, sq, sk]);
        s.mask_fill(blocked, f32::NEG_INFINITY)
    } else {
        s
    };
    let s = match &block.segments {
        Some((q_seg, k_seg)) => {
            let q_seg = q_seg.clone().reshape([b, 1, sq, 1]).expand([b, hq, sq, sk]);
            let k_seg = k_seg.clone().reshape([b, 1, 1, sk]).expand([b, hq, sq, sk]);
            s.mask_fill(q_seg.not_equal(k_seg), f32::NEG_INFINITY)
        }
        None => s,
    };
    (s, groups)
}

/// The flash-attention path (feature `flash`): f16/bf16 blocks without packed
/// sequences on a CubeCL device. The block's causal mask ("ends at the same position")
/// is the kernels' mask with the query block offset by `kv_len - q_len`.
#[cfg(feature = "flash")]
mod flash {
    use super::Block;
    use burn::tensor::{DType, Tensor};
    use longview_kernels::FlashOptions;
    use longview_kernels::burn_op;

    pub(super) fn options(block: &Block) -> Option<FlashOptions> {
        let [_, _, sq, _] = block.q.dims();
        let [_, _, sk, _] = block.k.dims();
        let half = matches!(block.q.dtype(), DType::BF16 | DType::F16);
        // What the kernels refuse (head dims past their limit) keeps the tensor ops.
        let d = block.q.dims()[3];
        if !half
            || d > longview_kernels::flash::MAX_HEAD_DIM
            || block.segments.is_some()
            || !burn_op::supported(&block.q.device())
        {
            return None;
        }
        let mut options = FlashOptions::new(d).causal(block.causal);
        options.scale = block.scale as f32;
        if block.causal {
            options = options.offsets(sk.saturating_sub(sq), 0);
        }
        Some(options)
    }

    /// The kernels' "no visible key" LSE sentinel as this module's `-inf`.
    pub(super) fn lse_out(lse: Tensor<3>) -> Tensor<3> {
        let dead = lse.clone().lower_elem(-1.0e38);
        lse.mask_fill(dead, f32::NEG_INFINITY)
    }

    pub(super) fn forward(block: &Block, options: &FlashOptions) -> (Tensor<4>, Tensor<3>) {
        let dtype = block.q.dtype();
        let (o, lse) = burn_op::flash_attention(
            block.q.clone(),
            block.k.clone().cast(dtype),
            block.v.clone().cast(dtype),
            options,
        )
        .expect("block shapes are valid flash-attention shapes");
        (o.cast(DType::F32), lse_out(lse))
    }
}

/// What computes the blocks of 16-bit (bf16/f16) q/k/v on `device` in this build
/// (the run's float dtype decides; f32 blocks and packed sequences always take the
/// tensor ops): for the attention plan.
pub fn block_kernel(device: &burn::tensor::Device) -> &'static str {
    let dtype: DType = device.settings().float_dtype.into();
    let half = matches!(dtype, DType::BF16 | DType::F16);
    #[cfg(feature = "flash")]
    if half && longview_kernels::burn_op::supported(device) {
        return "flash kernels";
    }
    if half {
        "tensor ops (this build has no flash kernels for this device)"
    } else {
        "tensor ops (f32)"
    }
}

/// `(O, LSE)`: O in f32 `[batch, q_heads, q_len, head_dim]`, LSE in f32
/// `[batch, q_heads, q_len]` (natural log of the softmax denominator, scale included).
pub fn forward(block: &Block) -> (Tensor<4>, Tensor<3>) {
    #[cfg(feature = "flash")]
    if let Some(options) = flash::options(block) {
        return flash::forward(block, &options);
    }
    let [b, hq, sq, _] = block.q.dims();
    let (s, groups) = scores(block);
    let max = s.clone().max_dim(3);
    // Rows with every key masked: shift by 0 so that p = 0, total = 0, LSE = -inf, O = 0.
    let empty = max.clone().equal_elem(f32::NEG_INFINITY);
    let max = max.mask_fill(empty, 0.0);
    let p = (s - max.clone()).exp();
    let total = p.clone().sum_dim(3);
    let lse = (max + total.clone().log()).reshape([b, hq, sq]);
    let v = expand_heads(block.v.clone().cast(DType::F32), groups);
    ((p / total.clamp_min(f32::MIN_POSITIVE)).matmul(v), lse)
}

/// `rowsum(dO * O)` in f32, `[batch, q_heads, q_len]`: the `D` of the FlashAttention-2
/// backward, computed once from the final output.
pub fn delta(o: Tensor<4>, d_o: Tensor<4>) -> Tensor<3> {
    let [b, h, s, _] = o.dims();
    (o.cast(DType::F32) * d_o.cast(DType::F32))
        .sum_dim(3)
        .reshape([b, h, s])
}

/// `(dQ, dK, dV)` in f32 for one block, given the LSE and `delta` of the FINAL output
/// (all blocks merged) and the upstream gradient `d_o` of those query rows.
pub fn backward(
    block: &Block,
    lse: Tensor<3>,
    delta: Tensor<3>,
    d_o: Tensor<4>,
) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
    #[cfg(feature = "flash")]
    if let Some(options) = flash::options(block) {
        let (dq, dk, dv) = longview_kernels::burn_op::flash_attention_backward_delta(
            (block.q.clone(), block.k.clone(), block.v.clone()),
            lse,
            delta,
            d_o,
            &options,
        )
        .expect("block shapes are valid flash-attention shapes");
        return (
            dq.cast(DType::F32),
            dk.cast(DType::F32),
            dv.cast(DType::F32),
        );
    }
    let (s, groups) = scores(block);
    // P recomputed from the stored statistics; masked scores are -inf, so P is 0 there.
    let p = (s - lse.unsqueeze_dim::<4>(3)).exp();
    let d_o = d_o.cast(DType::F32);
    let q = block.q.clone().cast(DType::F32);
    let k = expand_heads(block.k.clone().cast(DType::F32), groups);
    let v = expand_heads(block.v.clone().cast(DType::F32), groups);
    let d_v = p.clone().swap_dims(2, 3).matmul(d_o.clone());
    let d_p = d_o.matmul(v.swap_dims(2, 3));
    let d_s = p * (d_p - delta.unsqueeze_dim::<4>(3));
    let d_q = d_s.clone().matmul(k).mul_scalar(block.scale);
    let d_k = d_s.swap_dims(2, 3).matmul(q).mul_scalar(block.scale);
    (d_q, sum_heads(d_k, groups), sum_heads(d_v, groups))
}

/// Merges two partial results over disjoint key sets of the same query rows
/// (`longview_models::attention::merge_partials`, shared with one-device batched
/// decoding).
pub use longview_models::attention::merge_partials as merge;
