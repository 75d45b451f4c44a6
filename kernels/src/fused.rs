//! Fused elementwise kernels for inference: work that Burn runs as a chain of tensor
//! ops, each its own kernel launch, done in one launch. A decoding step of the 1.5B
//! model is mostly such small kernels (`benchmarks/inference.md`: ~40 per layer);
//! RMSNorm alone is eight (cast, square, mean, add, sqrt, cast, divide, scale).
//!
//! Forward only, on tensors without autodiff (decoding, prefill, GRPO's untracked
//! log-prob passes); training keeps Burn's ops and their autodiff.

use burn::backend::autodiff::{Autodiff, checkpoint::strategy::CheckpointStrategy};
use burn::backend::{Dispatch, backend_extension, tensor::FloatTensor};
use burn::tensor::{DType, Shape, Tensor};
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::{CubeCount, CubeDim, TensorArg};

/// Units per cube of the row kernels.
const UNITS: usize = 128;

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
                y[base + i] = F::cast_from(f32::cast_from(x[base + i]) * inv) * gamma[i];
                i += units;
            }
        }
    }
}
use kernel::rms_norm_kernel;

#[backend_extension(Autodiff, Cube: cfg(any(feature = "wgpu", feature = "cuda")))]
pub trait FusedBackend: burn::backend::Backend {
    /// RMSNorm of the rows of `x` (`[rows, d]`) with `gamma` (`[d]`, x's dtype).
    fn fused_rms_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        eps: f32,
    ) -> FloatTensor<Self>;
}

fn arg(t: &CubeTensor) -> TensorArg {
    // SAFETY: a contiguous tensor whose handle holds as many elements as its shape.
    unsafe {
        TensorArg::from_raw_parts(
            t.handle.clone(),
            t.meta.strides().to_vec().into(),
            t.meta.shape().to_vec().into(),
        )
    }
}

impl FusedBackend for CubeBackend {
    fn fused_rms_norm(x: CubeTensor, gamma: CubeTensor, eps: f32) -> CubeTensor {
        let (x, gamma) = (into_contiguous(x), into_contiguous(gamma));
        let [rows, d] = [x.meta.shape()[0], x.meta.shape()[1]];
        let client = x.client.clone();
        let bytes = rows * d * x.dtype.size();
        let y = CubeTensor::new_contiguous(
            client.clone(),
            x.device.clone(),
            Shape::new([rows, d]),
            client.empty(bytes.max(1)),
            x.dtype,
        );
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
}

impl<B: FusedBackend, C: CheckpointStrategy> FusedBackend for Autodiff<B, C> {
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
/// Same formula as `burn::nn::RmsNorm` (mean of squares in f32), the product with
/// the inverse root formed in f32 before rounding to x's dtype.
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
