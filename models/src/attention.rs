//! The one attention entry point of every model in longview.
//!
//! Model code builds an [`AttentionInput`] and calls [`attend`]; which implementation
//! runs is chosen by [`AttentionImpl`] in the model configuration. Today the only
//! implementation is [`AttentionImpl::Reference`], plain tensor ops that materialise
//! the score matrix (the numerical reference every kernel is tested against). The
//! CubeCL flash kernels and the sequence-parallel variants (ring, zigzag, Ulysses,
//! 2D) plug in here as further variants without touching model code.

use burn::config::Config;
use burn::tensor::activation::softmax;
use burn::tensor::{Bool, Tensor};

/// Which attention implementation the model calls.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum AttentionImpl {
    /// Plain tensor operations with a materialised `[B, H, Sq, Sk]` score matrix.
    /// Memory is quadratic in the sequence length: meant for tests, the debug model
    /// and short inputs.
    Reference,
}

/// Which query/key pairs may attend to each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionMask {
    /// Every query sees every key (vision encoder).
    Full,
    /// Query `i` sees key `j` when `j <= i + (Sk - Sq)`: the usual causal mask, with the
    /// query block aligned to the end of the key block (a KV cache appends keys).
    Causal,
}

/// Inputs of one attention call.
///
/// # Shapes
/// - `q`: `[batch, q_heads, q_len, head_dim]`
/// - `k`, `v`: `[batch, kv_heads, kv_len, head_dim]`; `kv_heads` divides `q_heads`
///   (grouped-query attention: query head `h` reads kv head `h / (q_heads / kv_heads)`).
#[derive(Debug, Clone)]
pub struct AttentionInput {
    pub q: Tensor<4>,
    pub k: Tensor<4>,
    pub v: Tensor<4>,
    pub mask: AttentionMask,
    /// Multiplies `q k^T`; usually `1 / sqrt(head_dim)`.
    pub scale: f64,
}

/// Runs attention with the configured implementation.
///
/// # Shapes
/// - output: `[batch, q_heads, q_len, head_dim]`
pub fn attend(implementation: AttentionImpl, input: AttentionInput) -> Tensor<4> {
    match implementation {
        AttentionImpl::Reference => reference_attention(input),
    }
}

/// Repeats each kv head `groups` times so that k/v line up with the query heads.
///
/// # Shapes
/// - input: `[batch, kv_heads, len, dim]`
/// - output: `[batch, kv_heads * groups, len, dim]`
pub fn repeat_kv(x: Tensor<4>, groups: usize) -> Tensor<4> {
    if groups == 1 {
        return x;
    }
    let [b, h, s, d] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, h, groups, s, d])
        .reshape([b, h * groups, s, d])
}

/// Boolean mask, `true` where attention is NOT allowed.
///
/// # Shapes
/// - output: `[q_len, kv_len]`
pub fn causal_block_mask(
    q_len: usize,
    kv_len: usize,
    device: &burn::tensor::Device,
) -> Tensor<2, Bool> {
    // `tril_mask` is false on and below diagonal `offset`, true above it.
    let offset = kv_len as i64 - q_len as i64;
    Tensor::<2, Bool>::tril_mask([q_len, kv_len], offset, device)
}

fn reference_attention(input: AttentionInput) -> Tensor<4> {
    let AttentionInput {
        q,
        k,
        v,
        mask,
        scale,
    } = input;
    let [b, hq, sq, d] = q.dims();
    let [bk, hkv, sk, dk] = k.dims();
    assert_eq!(
        (b, d),
        (bk, dk),
        "attention: q is [{b}, {hq}, {sq}, {d}] but k is [{bk}, {hkv}, {sk}, {dk}]"
    );
    assert!(
        hkv > 0 && hq % hkv == 0,
        "attention: kv heads ({hkv}) must divide query heads ({hq})"
    );
    let groups = hq / hkv;
    let k = repeat_kv(k, groups);
    let v = repeat_kv(v, groups);
    let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(scale);
    let scores = match mask {
        AttentionMask::Full => scores,
        AttentionMask::Causal => {
            let blocked = causal_block_mask(sq, sk, &scores.device())
                .unsqueeze_dims::<4>(&[0, 1])
                .expand([b, hq, sq, sk]);
            scores.mask_fill(blocked, f32::NEG_INFINITY)
        }
    };
    softmax(scores, 3).matmul(v)
}
