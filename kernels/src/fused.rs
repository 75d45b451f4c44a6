//! Fused elementwise kernels for inference: work that Burn runs as a chain of tensor
//! ops, each its own kernel launch, done in one launch. A decoding step of the 1.5B
//! model is mostly such small kernels (`benchmarks/inference.md`: ~40 per layer);
//! RMSNorm alone is eight (cast, square, mean, add, sqrt, cast, divide, scale).
//!
//! Forward only, on tensors without autodiff (decoding, prefill, GRPO's untracked
//! log-prob passes); training keeps Burn's ops and their autodiff. The arithmetic is
//! f32 throughout, rounded once to the tensor's dtype (Burn rounds after each op).

use burn::backend::autodiff::{Autodiff, checkpoint::strategy::CheckpointStrategy};
use burn::backend::{Dispatch, backend_extension, tensor::FloatTensor};
use burn::tensor::{DType, Shape, Tensor};
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::{CubeCount, CubeDim, TensorArg};

/// Units per cube of the row kernels.
const UNITS: usize = 128;
/// Units per cube of the elementwise kernels.
const ELEMENTWISE_UNITS: usize = 256;

mod kernel {
    use cubecl::prelude::*;

    /// `y = x / sqrt(mean(x^2) + eps) * gamma` over the last dimension, one cube per row
    /// (rows on a 2-D grid), the mean of squares accumulated in f32. `x`, `y`
    /// contiguous `[rows, d]`; `gamma` `[d]`.
    #[cube(launch)]
    pub fn rms_norm_kernel<F: Float>(
        x: &Tensor<F>,
        gamma: &Tensor<F>,
        y: &mut Tensor<F>,
        rows: u32,
        d: u32,
        eps: f32,
        #[comptime] units: usize,
    ) {
        let row = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize;
        let u = UNIT_POS_X as usize;
        let d = d as usize;
        let mut partial = Shared::<[f32]>::new_slice(units);
        if row < rows as usize {
            let base = row * d;
            let mut sum = 0.0f32;
            let mut i = u;
            while i < d {
                let v = f32::cast_from(x[base + i]);
                sum += v * v;
                i += units;
            }
            partial[u] = sum;
        } else {
            partial[u] = 0.0f32;
        }
        sync_cube();
        let mut stride = CUBE_DIM_X as usize / 2;
        while stride > 0 {
            if u < stride {
                partial[u] = partial[u] + partial[u + stride];
            }
            sync_cube();
            stride /= 2;
        }
        if row < rows as usize {
            let base = row * d;
            let inv = 1.0f32 / (partial[0] / f32::cast_from(d) + eps).sqrt();
            let mut i = u;
            while i < d {
                y[base + i] =
                    F::cast_from(f32::cast_from(x[base + i]) * inv * f32::cast_from(gamma[i]));
                i += units;
            }
        }
    }

    /// Rotary embedding in the rotate-half layout:
    /// `y[b, h, s, i] = x[b, h, s, i] * cos[b', 0, s, i] + x[b, h, s, other(i)] *
    /// signed_sin[b', 0, s, i]` (`other(i)`: the same place in the other half; `b' = 0`
    /// when the tables have one batch row). `x` and the tables at any strides; `y`
    /// contiguous. One unit per element on a 2-D grid of `units`-unit cubes.
    #[cube(launch)]
    pub fn rope_kernel<F: Float>(
        x: &Tensor<F>,
        cos: &Tensor<F>,
        sin: &Tensor<F>,
        y: &mut Tensor<F>,
        #[comptime] units: usize,
    ) {
        let pos = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize * units + UNIT_POS_X as usize;
        let heads = x.shape(1);
        let seq = x.shape(2);
        let dim = x.shape(3);
        if pos < x.shape(0) * heads * seq * dim {
            let i = pos % dim;
            let s = (pos / dim) % seq;
            let h = (pos / (dim * seq)) % heads;
            let b = pos / (dim * seq * heads);
            let half = dim / 2;
            let mut other = i + half;
            if i >= half {
                other = i - half;
            }
            let row = b * x.stride(0) + h * x.stride(1) + s * x.stride(2);
            let mut tb = b;
            if cos.shape(0) == 1 {
                tb = 0;
            }
            let at_c = tb * cos.stride(0) + s * cos.stride(2) + i * cos.stride(3);
            let at_s = tb * sin.stride(0) + s * sin.stride(2) + i * sin.stride(3);
            y[pos] = F::cast_from(
                f32::cast_from(x[row + i * x.stride(3)]) * f32::cast_from(cos[at_c])
                    + f32::cast_from(x[row + other * x.stride(3)]) * f32::cast_from(sin[at_s]),
            );
        }
    }

    /// `y = silu(gate) * up` elementwise (Qwen2's SwiGLU), the SiLU in f32; all three
    /// contiguous and of one shape. One unit per element on a 2-D grid.
    #[cube(launch)]
    pub fn swiglu_kernel<F: Float>(
        gate: &Tensor<F>,
        up: &Tensor<F>,
        y: &mut Tensor<F>,
        n: u32,
        #[comptime] units: usize,
    ) {
        let pos = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize * units + UNIT_POS_X as usize;
        if pos < n as usize {
            let g = f32::cast_from(gate[pos]);
            let silu = g / (1.0f32 + (-g).exp());
            y[pos] = F::cast_from(silu * f32::cast_from(up[pos]));
        }
    }
}
use kernel::{rms_norm_kernel, rope_kernel, swiglu_kernel};

#[backend_extension(Autodiff, Cube: cfg(any(feature = "wgpu", feature = "cuda")))]
pub trait FusedBackend: burn::backend::Backend {
    /// RMSNorm of the rows of `x` (`[rows, d]`) with `gamma` (`[d]`, x's dtype).
    fn fused_rms_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        eps: f32,
    ) -> FloatTensor<Self>;

    /// Rotary embedding of `x` (`[B, H, S, D]`) with the tables `cos` and `signed_sin`
    /// (`[B or 1, 1, S, D]`, x's dtype).
    fn fused_rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        signed_sin: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
    /// `silu(gate) * up` (same shape, same dtype).
    fn fused_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self>;
}

fn arg(t: &CubeTensor) -> TensorArg {
    // SAFETY: the handle holds every element the shape and strides address.
    unsafe {
        TensorArg::from_raw_parts(
            t.handle.clone(),
            t.meta.strides().to_vec().into(),
            t.meta.shape().to_vec().into(),
        )
    }
}

/// A new contiguous tensor shaped and typed like `like`'s `shape` (not initialised:
/// the kernels write every element).
fn output(like: &CubeTensor, shape: Vec<usize>) -> CubeTensor {
    let n: usize = shape.iter().product();
    let client = like.client.clone();
    let handle = client.empty((n * like.dtype.size()).max(1));
    CubeTensor::new_contiguous(
        client,
        like.device.clone(),
        Shape::from(shape),
        handle,
        like.dtype,
    )
}

impl FusedBackend for CubeBackend {
    fn fused_rms_norm(x: CubeTensor, gamma: CubeTensor, eps: f32) -> CubeTensor {
        let (x, gamma) = (into_contiguous(x), into_contiguous(gamma));
        let [rows, d] = [x.meta.shape()[0], x.meta.shape()[1]];
        let client = x.client.clone();
        let y = output(&x, vec![rows, d]);
        let (gx, gy) = if rows > 65535 {
            (65535, rows.div_ceil(65535))
        } else {
            (rows.max(1), 1)
        };
        let count = CubeCount::Static(gx as u32, gy as u32, 1);
        let dim = CubeDim::new_1d(UNITS as u32);
        macro_rules! launch {
            ($f:ty) => {
                rms_norm_kernel::launch::<$f>(
                    &client,
                    count,
                    dim,
                    arg(&x),
                    arg(&gamma),
                    arg(&y),
                    rows as u32,
                    d as u32,
                    eps,
                    UNITS,
                )
            };
        }
        match x.dtype {
            DType::F32 => launch!(f32),
            DType::F16 => launch!(half::f16),
            DType::BF16 => launch!(half::bf16),
            other => panic!("fused RMSNorm: unsupported dtype {other:?}"),
        }
        y
    }

    fn fused_rope(x: CubeTensor, cos: CubeTensor, signed_sin: CubeTensor) -> CubeTensor {
        launch_rope(x, cos, signed_sin)
    }

    fn fused_swiglu(gate: CubeTensor, up: CubeTensor) -> CubeTensor {
        let (gate, up) = (into_contiguous(gate), into_contiguous(up));
        let client = gate.client.clone();
        let n: usize = gate.meta.shape().iter().product();
        let y = output(&gate, gate.meta.shape().to_vec());
        let (count, dim) = elementwise_grid(n);
        macro_rules! launch {
            ($f:ty) => {
                swiglu_kernel::launch::<$f>(
                    &client,
                    count,
                    dim,
                    arg(&gate),
                    arg(&up),
                    arg(&y),
                    n as u32,
                    ELEMENTWISE_UNITS,
                )
            };
        }
        match gate.dtype {
            DType::F32 => launch!(f32),
            DType::F16 => launch!(half::f16),
            DType::BF16 => launch!(half::bf16),
            other => panic!("fused SwiGLU: unsupported dtype {other:?}"),
        }
        y
    }
}

/// The 2-D grid of [`ELEMENTWISE_UNITS`]-unit cubes over `n` elements.
fn elementwise_grid(n: usize) -> (CubeCount, CubeDim) {
    let cubes = n.div_ceil(ELEMENTWISE_UNITS).max(1);
    let (gx, gy) = if cubes > 65535 {
        (65535, cubes.div_ceil(65535))
    } else {
        (cubes, 1)
    };
    (
        CubeCount::Static(gx as u32, gy as u32, 1),
        CubeDim::new_1d(ELEMENTWISE_UNITS as u32),
    )
}

fn launch_rope(x: CubeTensor, cos: CubeTensor, sin: CubeTensor) -> CubeTensor {
    let client = x.client.clone();
    let n: usize = x.meta.shape().iter().product();
    let y = output(&x, x.meta.shape().to_vec());
    let (count, dim) = elementwise_grid(n);
    macro_rules! launch {
        ($f:ty) => {
            rope_kernel::launch::<$f>(
                &client,
                count,
                dim,
                arg(&x),
                arg(&cos),
                arg(&sin),
                arg(&y),
                ELEMENTWISE_UNITS,
            )
        };
    }
    match x.dtype {
        DType::F32 => launch!(f32),
        DType::F16 => launch!(half::f16),
        DType::BF16 => launch!(half::bf16),
        other => panic!("fused RoPE: unsupported dtype {other:?}"),
    }
    y
}

impl<B: FusedBackend, C: CheckpointStrategy> FusedBackend for Autodiff<B, C> {
    fn fused_rope(
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        panic!("fused RoPE has no backward: call it on tensors without autodiff")
    }

    fn fused_swiglu(_: FloatTensor<Self>, _: FloatTensor<Self>) -> FloatTensor<Self> {
        panic!("fused SwiGLU has no backward: call it on tensors without autodiff")
    }

    fn fused_rms_norm(_: FloatTensor<Self>, _: FloatTensor<Self>, _: f32) -> FloatTensor<Self> {
        // `rms_norm` refuses tensors on an autodiff device before they get here: the
        // fused kernels have no backward.
        panic!("fused RMSNorm has no backward: call it on tensors without autodiff")
    }
}

/// Whether the fused kernels run (`LONGVIEW_FUSED`, read once).
pub fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| {
        !matches!(
            std::env::var("LONGVIEW_FUSED").as_deref(),
            Ok("off") | Ok("0") | Ok("false")
        )
    })
}

/// RMSNorm of `x` (`[..., d]`) over its last dimension with `gamma` (`[d]`) in one
/// kernel launch; `None` where it cannot run (not a CubeCL device, a tensor on an
/// autodiff device, a dtype other than f32/f16/bf16): the caller keeps Burn's ops.
/// Same formula as `burn::nn::RmsNorm` (mean of squares in f32), the whole row's
/// arithmetic in f32 and rounded once to x's dtype.
/// `LONGVIEW_FUSED=off` (or `0`) turns the fused kernels off (A/B timing in one
/// binary; a way around a suspected kernel fault).
pub fn rms_norm<const D: usize>(x: Tensor<D>, gamma: Tensor<1>, eps: f64) -> Option<Tensor<D>> {
    let dtype = x.dtype();
    if !enabled()
        || x.is_autodiff()
        || !crate::burn_op::supported(&x.device())
        || !matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
    {
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
/// negated) in one kernel launch; `None` where it cannot run (as [`rms_norm`]).
/// `x cos + swap_halves(x) signed_sin` in x's dtype.
pub fn rope(x: Tensor<4>, cos: &Tensor<4>, signed_sin: &Tensor<4>) -> Option<Tensor<4>> {
    let dtype = x.dtype();
    let [b, _, s, d] = x.dims();
    let [tb, one, ts, td] = cos.dims();
    if !enabled()
        || x.is_autodiff()
        || !crate::burn_op::supported(&x.device())
        || !matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
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

/// `silu(gate) * up` (Qwen2's MLP activation) in one kernel launch, the SiLU in f32;
/// `None` where it cannot run (as [`rms_norm`], or shapes or dtypes that differ).
pub fn swiglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Option<Tensor<D>> {
    let dtype = gate.dtype();
    if !enabled()
        || gate.is_autodiff()
        || up.is_autodiff()
        || !crate::burn_op::supported(&gate.device())
        || !matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
        || up.dtype() != dtype
        || gate.dims() != up.dims()
    {
        return None;
    }
    if gate.shape().num_elements() == 0 {
        return Some(gate);
    }
    let y = <Dispatch as FusedBackend>::fused_swiglu(gate.into_dispatch(), up.into_dispatch());
    Some(Tensor::from_dispatch(y))
}
