//! Fused kernels for Qwen2's and SigLIP's elementwise work: what Burn runs as a chain of tensor
//! ops, each its own kernel launch, done in one launch. A decoding step of the 1.5B
//! model is mostly such small kernels (`benchmarks/inference.md`: ~40 per layer);
//! by Burn 0.22's op definitions RMSNorm is about nine launches (casts, square, mean,
//! add, sqrt, divide, scale), the rotary embedding five per tensor, SwiGLU ten (the
//! sigmoid alone is eight); SigLIP's LayerNorm about ten and its tanh GELU eight.
//!
//! Each op has its backward (`autodiff`): RMSNorm, LayerNorm, SwiGLU and GELU through backward kernels
//! from the saved inputs, the rotary embedding through the transposed rotation. The
//! arithmetic is f32 throughout, each output rounded once to the tensor's dtype (Burn
//! rounds after each op). `LONGVIEW_FUSED=off` turns them off (A/B timing in one
//! binary; a way around a suspected kernel fault).

use burn::backend::{Dispatch, backend_extension, tensor::FloatTensor};
use burn::tensor::{DType, Tensor};

mod adamw;
mod autodiff;
pub(crate) mod cube;
mod kernels;
mod layer_norm_gelu;

#[backend_extension(Autodiff, Cube: cfg(any(feature = "wgpu", feature = "cuda")))]
pub trait FusedBackend: burn::backend::Backend {
    /// RMSNorm of the rows of `x` (`[rows, d]`) with `gamma` (`[d]`, x's dtype).
    fn fused_rms_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        eps: f32,
    ) -> FloatTensor<Self>;

    /// `(dx, dgamma)` of [`FusedBackend::fused_rms_norm`] given the output's gradient.
    fn fused_rms_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        eps: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// Rotary embedding of `x` (`[B, H, S, D]`) with the tables `cos` and `signed_sin`
    /// (`[B or 1, 1, S, D]`, x's dtype).
    fn fused_rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        signed_sin: FloatTensor<Self>,
    ) -> FloatTensor<Self>;

    /// The transposed rotation (the rotary embedding's backward, `dy` to `dx`).
    fn fused_rope_transposed(
        dy: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        signed_sin: FloatTensor<Self>,
    ) -> FloatTensor<Self>;

    /// `silu(gate) * up` (same shape, same dtype).
    fn fused_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self>;

    /// `(d_gate, d_up)` of [`FusedBackend::fused_swiglu`] given the output's gradient.
    fn fused_swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// LayerNorm of the rows of `x` (`[rows, d]`) with `gamma` and `beta` (`[d]`, x's
    /// dtype), biased variance.
    fn fused_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f32,
    ) -> FloatTensor<Self>;

    /// `(dx, dgamma, dbeta)` of [`FusedBackend::fused_layer_norm`] given the output's
    /// gradient.
    fn fused_layer_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        eps: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// The tanh approximation of GELU, elementwise.
    fn fused_gelu_tanh(x: FloatTensor<Self>) -> FloatTensor<Self>;

    /// `dx` of [`FusedBackend::fused_gelu_tanh`] given the output's gradient.
    fn fused_gelu_tanh_backward(x: FloatTensor<Self>, dy: FloatTensor<Self>) -> FloatTensor<Self>;

    /// One AdamW update (`adamw::AdamWStep`): `(param', m', v')` from the parameter, its
    /// gradient and the moments `m`, `v` (`fresh`: before the first step, when `m` and `v`
    /// are not read). Not differentiable (an optimizer's update).
    fn fused_adamw(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        m: FloatTensor<Self>,
        v: FloatTensor<Self>,
        fresh: bool,
        step: AdamWStep,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

pub use adamw::AdamWStep;

/// One AdamW update of `param` with `grad` and the moments `(m, v)` of the steps before
/// (`None` before the first) in one kernel launch: the new `(param, m, v)`, Burn's
/// `AdamW` formula (`adamw` module docs) with every value f32; `None` where it cannot run
/// (switched off with `LONGVIEW_FUSED`, not a CubeCL device, not all f32, shapes apart):
/// the caller keeps Burn's optimizer. The tensors are plain (no autodiff graph).
pub fn adamw_step<const D: usize>(
    param: Tensor<D>,
    grad: Tensor<D>,
    moments: Option<(Tensor<D>, Tensor<D>)>,
    step: AdamWStep,
) -> Option<(Tensor<D>, Tensor<D>, Tensor<D>)> {
    let all_f32 = param.dtype() == DType::F32
        && grad.dtype() == DType::F32
        && moments
            .as_ref()
            .is_none_or(|(m, v)| m.dtype() == DType::F32 && v.dtype() == DType::F32);
    let dims = param.dims();
    let same_shape = grad.dims() == dims
        && moments
            .as_ref()
            .is_none_or(|(m, v)| m.dims() == dims && v.dims() == dims);
    if !runs_on(&param.device(), DType::F32) || !all_f32 || !same_shape || step.time == 0 {
        return None;
    }
    let fresh = moments.is_none();
    // Before the first step the kernel does not read the moments: the gradient stands in.
    let (m, v) = moments.unwrap_or_else(|| (grad.clone(), grad.clone()));
    let (p, m, v) = <Dispatch as FusedBackend>::fused_adamw(
        param.into_dispatch(),
        grad.into_dispatch(),
        m.into_dispatch(),
        v.into_dispatch(),
        fresh,
        step,
    );
    Some((
        Tensor::from_dispatch(p),
        Tensor::from_dispatch(m),
        Tensor::from_dispatch(v),
    ))
}

/// Whether the fused kernels run (`LONGVIEW_FUSED`, a switch, on by default; read
/// once).
pub fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| crate::env_switch::switch("LONGVIEW_FUSED", true))
}

/// Whether the fused kernels run for `dtype` tensors on `device`: switched on, a CubeCL
/// device, f32, f16 or bf16.
fn runs_on(device: &burn::tensor::Device, dtype: DType) -> bool {
    enabled()
        && crate::burn_op::supported(device)
        && matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
}

/// RMSNorm of `x` (`[..., d]`) over its last dimension with `gamma` (`[d]`) in one
/// kernel launch (differentiable in both); `None` where it cannot run (not a CubeCL
/// device, a dtype other than f32/f16/bf16): the caller keeps Burn's ops.
/// Same formula as `burn::nn::RmsNorm` (mean of squares in f32), the whole row's
/// arithmetic in f32 and rounded once to x's dtype.
pub fn rms_norm<const D: usize>(x: Tensor<D>, gamma: Tensor<1>, eps: f64) -> Option<Tensor<D>> {
    let dtype = x.dtype();
    if !runs_on(&x.device(), dtype) {
        return None;
    }
    let dims = x.dims();
    let d = dims[D - 1];
    if gamma.dims() != [d] || d == 0 {
        return None;
    }
    let rows = dims[..D - 1].iter().product::<usize>();
    if rows == 0 {
        return Some(x);
    }
    let y = <Dispatch as FusedBackend>::fused_rms_norm(
        x.reshape([rows, d]).into_dispatch(),
        gamma.cast(dtype).into_dispatch(),
        eps as f32,
    );
    Some(Tensor::<2>::from_dispatch(y).reshape(dims))
}

/// Rotary embedding (rotate-half layout) of `x` (`[B, H, S, D]`, D even) with the
/// tables `cos` and `signed_sin` (`[B or 1, 1, S, D]`, the first half of the sine
/// negated) in one kernel launch, differentiable in `x` (the tables are constants);
/// `None` where it cannot run (as [`rms_norm`]). `x cos + swap_halves(x) signed_sin`.
pub fn rope(x: Tensor<4>, cos: &Tensor<4>, signed_sin: &Tensor<4>) -> Option<Tensor<4>> {
    let dtype = x.dtype();
    let [b, _, s, d] = x.dims();
    let [tb, one, ts, td] = cos.dims();
    if !runs_on(&x.device(), dtype)
        || d % 2 != 0
        || one != 1
        || (tb != b && tb != 1)
        || ts != s
        || td != d
        || signed_sin.dims() != cos.dims()
    {
        return None;
    }
    if x.shape().num_elements() == 0 {
        return Some(x);
    }
    let y = <Dispatch as FusedBackend>::fused_rope(
        x.into_dispatch(),
        cos.clone().cast(dtype).into_dispatch(),
        signed_sin.clone().cast(dtype).into_dispatch(),
    );
    Some(Tensor::from_dispatch(y))
}

/// `silu(gate) * up` (Qwen2's MLP activation) in one kernel launch, differentiable in
/// both; `None` where it cannot run (as [`rms_norm`], or shapes or dtypes that differ).
pub fn swiglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Option<Tensor<D>> {
    let dtype = gate.dtype();
    if !runs_on(&gate.device(), dtype) || up.dtype() != dtype || gate.dims() != up.dims() {
        return None;
    }
    if gate.shape().num_elements() == 0 {
        return Some(gate);
    }
    let y = <Dispatch as FusedBackend>::fused_swiglu(gate.into_dispatch(), up.into_dispatch());
    Some(Tensor::from_dispatch(y))
}

/// The widest row [`layer_norm`] takes: its backward keeps two f32 sums a column in
/// shared memory (32 KiB at 4096, within what wgpu and CUDA give a cube).
pub const LAYER_NORM_MAX_WIDTH: usize = 4096;

/// LayerNorm of `x` (`[..., d]`) over its last dimension with `gamma` and `beta`
/// (`[d]`) in one kernel launch, differentiable in all three; `None` where it cannot
/// run (as [`rms_norm`], or no `beta`, or `d` past [`LAYER_NORM_MAX_WIDTH`]): the
/// caller keeps Burn's ops. Same formula as `burn::nn::LayerNorm` and
/// `torch.nn.LayerNorm` (biased variance), the row's arithmetic in f32 (two passes for
/// the variance), rounded once to x's dtype.
pub fn layer_norm<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Option<Tensor<1>>,
    eps: f64,
) -> Option<Tensor<D>> {
    let dtype = x.dtype();
    let beta = beta?;
    if !runs_on(&x.device(), dtype) {
        return None;
    }
    let dims = x.dims();
    let d = dims[D - 1];
    if gamma.dims() != [d] || beta.dims() != [d] || d == 0 || d > LAYER_NORM_MAX_WIDTH {
        return None;
    }
    let rows = dims[..D - 1].iter().product::<usize>();
    if rows == 0 {
        return Some(x);
    }
    let y = <Dispatch as FusedBackend>::fused_layer_norm(
        x.reshape([rows, d]).into_dispatch(),
        gamma.cast(dtype).into_dispatch(),
        beta.cast(dtype).into_dispatch(),
        eps as f32,
    );
    Some(Tensor::<2>::from_dispatch(y).reshape(dims))
}

/// GELU's tanh approximation (`gelu_pytorch_tanh`, Burn's `gelu_approximate`) in one
/// kernel launch, differentiable; `None` where it cannot run (as [`rms_norm`]).
pub fn gelu_tanh<const D: usize>(x: Tensor<D>) -> Option<Tensor<D>> {
    let dtype = x.dtype();
    if !runs_on(&x.device(), dtype) {
        return None;
    }
    if x.shape().num_elements() == 0 {
        return Some(x);
    }
    let y = <Dispatch as FusedBackend>::fused_gelu_tanh(x.into_dispatch());
    Some(Tensor::from_dispatch(y))
}
