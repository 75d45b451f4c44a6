//! The one attention entry point of every model in longview.
//!
//! Model code builds an [`AttentionInput`] and calls [`attend`]; which implementation
//! runs is chosen by [`AttentionImpl`] in the model configuration:
//! [`AttentionImpl::Reference`], plain tensor ops that materialise the score matrix
//! (the numerical reference every kernel is tested against), or
//! [`AttentionImpl::Sharded`], the sequence-parallel attention (ring, zigzag, Ulysses,
//! 2D from `longview-parallel`) that the parallel layer installs on the rank's thread
//! with [`install_sharded_attention`]. Model code stays single-device code: it never
//! sees a communicator, only its shard of the sequence (and matching position ids).

use std::cell::RefCell;
use std::sync::Arc;

use burn::config::Config;
use burn::tensor::activation::{log_sigmoid, sigmoid, softmax};
use burn::tensor::{Bool, DType, Tensor};

/// Which attention implementation the model calls.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum AttentionImpl {
    /// Plain tensor operations with a materialised `[B, H, Sq, Sk]` score matrix.
    /// Memory is quadratic in the sequence length: meant for tests, the debug model
    /// and short inputs.
    Reference,
    /// longview's CubeCL flash-attention kernels (`longview-kernels`): O and its
    /// gradients without the score matrix, memory linear in the sequence length. Needs
    /// tensors on a CubeCL device (CUDA, wgpu) and a build with the `flash-cuda` or
    /// `flash-wgpu` feature ([`flash_available`] says whether both hold); anything
    /// else panics with the reason. The trainer's `run.attention = "auto"` (its
    /// default) picks it on CUDA; library users choose it per model
    /// (`Vlm::with_attention`), and `VlmConfig`'s default stays the reference.
    Flash,
    /// The [`ShardedAttention`] installed on the calling thread
    /// ([`install_sharded_attention`]); q, k, v are this rank's shard of the sequence.
    Sharded,
}

/// An attention over a sequence sharded across ranks (implemented by
/// `longview-parallel`). Called with this rank's q, k, v shards; returns this rank's
/// output shard, tracked for autodiff when the inputs are.
pub trait ShardedAttention: Send + Sync {
    fn attend(&self, input: AttentionInput) -> Tensor<4>;

    /// This rank's output and the log-sum-exp of each query row (`[batch, heads,
    /// q_len]`, f32), untracked: what recomputation keeps so that the distributed
    /// forward never runs twice.
    fn attend_with_lse(&self, input: AttentionInput) -> (Tensor<4>, Tensor<3>);

    /// This rank's dQ, dK, dV (untracked) from the kept output and LSE, given dO: the
    /// scheme's distributed backward alone.
    fn input_grads(
        &self,
        input: AttentionInput,
        o: Tensor<4>,
        lse: Tensor<3>,
        d_o: Tensor<4>,
    ) -> (Tensor<4>, Tensor<4>, Tensor<4>);
}

/// The sharded attention installed on this thread; panics when there is none (a model
/// configured for sequence parallelism ran outside it).
fn installed_sharded() -> Arc<dyn ShardedAttention> {
    let installed = SHARDED.with(|slot| slot.borrow().clone());
    // A configuration error the trainer checks before the first step.
    installed.unwrap_or_else(|| {
        panic!(
            "the model is configured with AttentionImpl::Sharded but no sequence-parallel \
             attention is installed on this thread (longview_parallel::model::install)"
        )
    })
}

thread_local! {
    static SHARDED: RefCell<Option<Arc<dyn ShardedAttention>>> = const { RefCell::new(None) };
}

/// Makes `attention` what [`AttentionImpl::Sharded`] calls on this thread until the
/// returned guard is dropped (the previous one, if any, is restored then).
pub fn install_sharded_attention(attention: Arc<dyn ShardedAttention>) -> ShardedGuard {
    let previous = SHARDED.with(|slot| slot.borrow_mut().replace(attention));
    ShardedGuard { previous }
}

/// Restores the previously installed sharded attention when dropped.
#[must_use = "the sharded attention is uninstalled when the guard is dropped"]
pub struct ShardedGuard {
    previous: Option<Arc<dyn ShardedAttention>>,
}

impl Drop for ShardedGuard {
    fn drop(&mut self) {
        let previous = self.previous.take();
        SHARDED.with(|slot| *slot.borrow_mut() = previous);
    }
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
        AttentionImpl::Flash => flash::attend(input),
        AttentionImpl::Sharded => installed_sharded().attend(input),
    }
}

/// A transformer layer seen as the parts before and after its attention: what the
/// rematerialising checkpointing (LightSeq, `longview-train`'s `remat`) replays around
/// an attention output it stored, so that the attention forward never runs twice.
/// `forward(x) = after_attention(x, attend(attention_input(x)))`.
pub trait SplitAtAttention {
    /// What every layer of the stack shares (RoPE tables for the LLM, nothing for the
    /// vision encoder).
    type Context;

    /// Norm, projections and position encoding: the attention's q, k, v.
    fn attention_input(&self, x: Tensor<3>, context: &Self::Context) -> AttentionInput;

    /// Output projection, residuals and the MLP, from the attention output
    /// `[batch, heads, seq, head_dim]`.
    fn after_attention(&self, x: Tensor<3>, attention: Tensor<4>) -> Tensor<3>;

    /// The attention implementation the layer calls.
    fn attention_impl(&self) -> AttentionImpl;

    /// The whole layer.
    fn forward_split(&self, x: Tensor<3>, context: &Self::Context) -> Tensor<3> {
        let input = self.attention_input(x.clone(), context);
        self.after_attention(x, attend(self.attention_impl(), input))
    }
}

/// Runs attention and also returns the log-sum-exp of each query row (`[batch, heads,
/// q_len]`, f32) where the implementation computes it ([`AttentionImpl::Flash`] and
/// [`AttentionImpl::Sharded`]); `None` for the tensor-op reference.
pub fn attend_with_lse(
    implementation: AttentionImpl,
    input: AttentionInput,
) -> (Tensor<4>, Option<Tensor<3>>) {
    match implementation {
        AttentionImpl::Flash => {
            let (o, lse) = flash::attend_with_lse(input);
            (o, Some(lse))
        }
        AttentionImpl::Sharded => {
            let (o, lse) = installed_sharded().attend_with_lse(input);
            (o, Some(lse))
        }
        AttentionImpl::Reference => (reference_attention(input), None),
    }
}

/// The gradients of q, k and v (untracked) of an attention whose output `o` (and,
/// from the flash kernels or a sequence-parallel scheme, `lse`) were kept from the
/// forward pass, given the output's gradient `d_o`. With an LSE the flash backward
/// kernels (or the scheme's distributed backward) run from it and the forward is not
/// recomputed; without one (the reference) the attention is recomputed under autodiff.
///
/// # Shapes
/// - `input`'s q, k, v as in [`AttentionInput`]; o, d_o: like q; lse: `[batch, heads, q_len]`
pub fn attention_input_grads(
    implementation: AttentionImpl,
    input: AttentionInput,
    o: Tensor<4>,
    lse: Option<Tensor<3>>,
    d_o: Tensor<4>,
) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
    let AttentionInput {
        q,
        k,
        v,
        mask,
        scale,
    } = input;
    let (q, k, v) = (q.detach(), k.detach(), v.detach());
    match (implementation, lse) {
        (AttentionImpl::Flash, Some(lse)) => flash::input_grads(
            AttentionInput {
                q,
                k,
                v,
                mask,
                scale,
            },
            o,
            lse,
            d_o,
        ),
        (AttentionImpl::Sharded, Some(lse)) => installed_sharded().input_grads(
            AttentionInput {
                q,
                k,
                v,
                mask,
                scale,
            },
            o.detach(),
            lse,
            d_o.detach(),
        ),
        (implementation, _) => recomputed_input_grads(implementation, q, k, v, mask, scale, d_o),
    }
}

/// dQ, dK, dV of `implementation`'s attention recomputed under autodiff.
fn recomputed_input_grads(
    implementation: AttentionImpl,
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    mask: AttentionMask,
    scale: f64,
    d_o: Tensor<4>,
) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
    let (q, k, v) = (q.require_grad(), k.require_grad(), v.require_grad());
    let out = attend(
        implementation,
        AttentionInput {
            q: q.clone(),
            k: k.clone(),
            v: v.clone(),
            mask,
            scale,
        },
    );
    let grads = (out.cast(DType::F32) * d_o.cast(DType::F32))
        .sum()
        .backward();
    let grad = |t: Tensor<4>| {
        t.grad(&grads)
            .unwrap_or_else(|| Tensor::zeros(t.dims(), (&t.device(), t.dtype())))
    };
    (grad(q), grad(k), grad(v))
}

/// Merges two partial results over disjoint key sets of the same query rows, in the
/// logsigmoid form that cannot overflow:
/// `L = L1 - logsigmoid(L1 - L2)`, `O = O1 - sigmoid(L2 - L1) * (O1 - O2)` (f32).
/// A side whose rows saw no key (LSE = -inf, packed sequences) leaves the other as is.
pub fn merge_partials(
    (o1, l1): (Tensor<4>, Tensor<3>),
    (o2, l2): (Tensor<4>, Tensor<3>),
) -> (Tensor<4>, Tensor<3>) {
    let o1 = o1.cast(DType::F32);
    let o2 = o2.cast(DType::F32);
    let dims = o1.dims();
    let dead1 = l1.clone().equal_elem(f32::NEG_INFINITY);
    let dead2 = l2.clone().equal_elem(f32::NEG_INFINITY);
    // Finite stand-ins keep -inf - -inf (NaN) out of the formula; the selects below put
    // the right values back for those rows.
    let (f1, f2) = (
        l1.clone().mask_fill(dead1.clone(), 0.0),
        l2.clone().mask_fill(dead2.clone(), 0.0),
    );
    let weight2 = sigmoid(f2.clone() - f1.clone()).unsqueeze_dim::<4>(3);
    let o = o1.clone() - weight2 * (o1.clone() - o2.clone());
    let l = f1.clone() - log_sigmoid(f1 - f2);
    let rows = |m: Tensor<3, Bool>| m.unsqueeze_dim::<4>(3).expand(dims);
    let o = o
        .mask_where(rows(dead1.clone()), o2)
        .mask_where(rows(dead2.clone()), o1);
    let l = l.mask_where(dead1, l2).mask_where(dead2, l1);
    (o, l)
}

/// Most query rows per kv head (query heads per kv head x query positions) that
/// [`AttentionImpl::Flash`] runs on its split-key decode kernels; a bigger call runs
/// the tensor-core forward, which gives each query head its own pass over every key.
/// Callers that batch decoding rows split their calls to stay under it. No limit in
/// a build without the kernels.
pub const FLASH_DECODE_MAX_ROWS: usize = flash::DECODE_MAX_ROWS;

/// Whether `rows` query rows per kv head fit [`FLASH_DECODE_MAX_ROWS`].
pub fn fits_flash_decode(rows: usize) -> bool {
    // Not `rows <= FLASH_DECODE_MAX_ROWS`: without the kernels the limit is usize::MAX
    // and clippy rejects that comparison as always true.
    FLASH_DECODE_MAX_ROWS.checked_sub(rows).is_some()
}

/// Whether [`AttentionImpl::Flash`] can run on `device` in this build.
pub fn flash_available(device: &burn::tensor::Device) -> bool {
    flash::available(device)
}

#[cfg(any(feature = "flash-cuda", feature = "flash-wgpu"))]
mod flash {
    pub use longview_kernels::flash::DECODE_MAX_ROWS;

    use super::{AttentionInput, AttentionMask};
    use burn::tensor::{DType, Tensor};
    use longview_kernels::FlashOptions;
    use longview_kernels::burn_op::{flash_attention, flash_attention_backward_delta, supported};

    pub fn available(device: &burn::tensor::Device) -> bool {
        supported(device)
    }

    fn options(input: &AttentionInput) -> FlashOptions {
        let [_, _, sq, d] = input.q.dims();
        let sk = input.k.dims()[2];
        let causal = input.mask == AttentionMask::Causal;
        // The reference's causal mask aligns the query block to the end of the keys.
        let mut options = FlashOptions::new(d)
            .causal(causal)
            .offsets(if causal { sk.saturating_sub(sq) } else { 0 }, 0);
        options.scale = input.scale as f32;
        options
    }

    pub fn attend(input: AttentionInput) -> Tensor<4> {
        attend_with_lse(input).0
    }

    pub fn attend_with_lse(input: AttentionInput) -> (Tensor<4>, Tensor<3>) {
        let options = options(&input);
        flash_attention(input.q, input.k, input.v, &options)
            .unwrap_or_else(|e| panic!("AttentionImpl::Flash: {e}"))
    }

    pub fn input_grads(
        input: AttentionInput,
        o: Tensor<4>,
        lse: Tensor<3>,
        d_o: Tensor<4>,
    ) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
        let options = options(&input);
        // delta = rowsum(dO * O), what the flash backward needs besides the LSE.
        let delta = (d_o.clone().cast(DType::F32) * o.cast(DType::F32))
            .sum_dim(3)
            .squeeze_dim::<3>(3);
        let d_o = d_o.cast(input.q.dtype());
        flash_attention_backward_delta((input.q, input.k, input.v), lse, delta, d_o, &options)
            .unwrap_or_else(|e| panic!("AttentionImpl::Flash backward: {e}"))
    }
}

#[cfg(not(any(feature = "flash-cuda", feature = "flash-wgpu")))]
mod flash {
    use super::AttentionInput;
    use burn::tensor::Tensor;

    pub const DECODE_MAX_ROWS: usize = usize::MAX;

    pub fn available(_device: &burn::tensor::Device) -> bool {
        false
    }

    const MISSING: &str = "AttentionImpl::Flash: this build has no flash kernels (enable \
                           longview-models' `flash-cuda` or `flash-wgpu` feature)";

    pub fn attend(_input: AttentionInput) -> Tensor<4> {
        panic!("{MISSING}")
    }

    pub fn attend_with_lse(_input: AttentionInput) -> (Tensor<4>, Tensor<3>) {
        panic!("{MISSING}")
    }

    pub fn input_grads(
        _input: AttentionInput,
        _o: Tensor<4>,
        _lse: Tensor<3>,
        _d_o: Tensor<4>,
    ) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
        panic!("{MISSING}")
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
    // Softmax statistics in f32 whatever the input dtype (as flash kernels do).
    let dtype = v.dtype();
    softmax(scores.cast(DType::F32), 3).cast(dtype).matmul(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Distribution};

    /// Attention from the definition in f64 (`longview_kernels::reference`, shared by
    /// the kernel tests), with the causal mask aligned to the end of the keys.
    fn naive(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        dims: [usize; 6],
        causal: bool,
        scale: f64,
    ) -> Vec<f32> {
        let [b, hq, hkv, sq, sk, d] = dims;
        let geometry = longview_kernels::reference::Geometry {
            batch: b,
            q_heads: hq,
            kv_heads: hkv,
            q_len: sq,
            kv_len: sk,
            head_dim: d,
            scale,
            empty_lse: f64::NEG_INFINITY,
        };
        let visible =
            |_, i: usize, j: usize| !causal || j as i64 <= i as i64 + sk as i64 - sq as i64;
        longview_kernels::reference::attention_f64(&geometry, q, k, v, None, visible)
            .o
            .into_iter()
            .map(|x| x as f32)
            .collect()
    }

    fn check(dims: [usize; 6], causal: bool) {
        let device = Device::flex();
        let [b, hq, hkv, sq, sk, d] = dims;
        let dist = Distribution::Normal(0.0, 1.0);
        let q = Tensor::<4>::random([b, hq, sq, d], dist, &device);
        let k = Tensor::<4>::random([b, hkv, sk, d], dist, &device);
        let v = Tensor::<4>::random([b, hkv, sk, d], dist, &device);
        let data = |t: &Tensor<4>| t.clone().try_into_vec_as::<f32>().unwrap();
        let expected = naive(&data(&q), &data(&k), &data(&v), dims, causal, 0.37);
        let mask = if causal {
            AttentionMask::Causal
        } else {
            AttentionMask::Full
        };
        let out = attend(
            AttentionImpl::Reference,
            AttentionInput {
                q,
                k,
                v,
                mask,
                scale: 0.37,
            },
        );
        let actual = out.try_into_vec_as::<f32>().unwrap();
        let worst = actual
            .iter()
            .zip(&expected)
            .map(|(a, e)| (a - e).abs())
            .fold(0f32, f32::max);
        // f32 softmax/matmul against an f64 loop: round-off level.
        assert!(
            worst < 1e-5,
            "{dims:?} causal={causal}: max abs error {worst}"
        );
    }

    #[test]
    fn reference_matches_definition_mha_gqa_mqa_and_ragged() {
        check([2, 4, 4, 5, 5, 8], true); // MHA
        check([1, 6, 2, 7, 7, 4], true); // GQA, groups of 3
        check([1, 4, 1, 3, 3, 6], false); // MQA, full mask
        check([1, 4, 2, 3, 9, 5], true); // Sq < Sk: queries aligned to the end (KV cache)
        check([2, 2, 1, 6, 4, 3], false); // Sq > Sk, full mask
    }

    #[test]
    fn causal_mask_blocks_exactly_the_future() {
        let mask = causal_block_mask(2, 4, &Device::flex());
        let values = mask.try_into_vec_as::<bool>().unwrap();
        // query 0 sits at key position 2, query 1 at 3.
        assert_eq!(
            values,
            vec![false, false, false, true, false, false, false, false]
        );
    }
}
