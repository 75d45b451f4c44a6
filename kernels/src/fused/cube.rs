//! The fused ops on the CubeCL backend (CUDA, wgpu): output allocation and launches.

use burn::backend::ops::FloatTensorOps;
use burn::tensor::{DType, FloatDType, Shape};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeBackend, CubeDevice};
use cubecl::prelude::{CubeCount, CubeDim, TensorArg};

use super::FusedBackend;
use super::adamw::adamw_kernel;
use super::kernels::{
    rms_norm_backward_kernel, rms_norm_kernel, rope_kernel, swiglu_backward_kernel, swiglu_kernel,
};
use super::layer_norm_gelu::{
    gelu_tanh_backward_kernel, gelu_tanh_kernel, layer_norm_backward_kernel, layer_norm_kernel,
};

/// Units per cube of the row kernels (a power of two: the cube sums halve it).
const ROW_UNITS: usize = 128;
/// Units per cube of the elementwise kernels.
const ELEMENTWISE_UNITS: usize = 256;
/// Rows a cube of LayerNorm's backward takes (its gamma/beta sums cover them, so the
/// partial sums are `rows / 32` rows instead of one a row).
const LAYER_NORM_BACKWARD_ROWS: usize = 32;

/// The rows of `parts` (`[n, d]` f32) summed into `[d]`, in `dtype` (a float dtype).
fn sum_rows(parts: CubeTensor, d: usize, dtype: DType) -> CubeTensor {
    let sum = CubeBackend::float_sum_dim(parts, 0);
    let sum = CubeBackend::float_reshape(sum, Shape::new([d]));
    let dtype: FloatDType = dtype.into();
    CubeBackend::float_cast(sum, dtype)
}

pub(crate) fn arg(t: &CubeTensor) -> TensorArg {
    // SAFETY: the handle holds every element the shape and strides address.
    unsafe {
        TensorArg::from_raw_parts(
            t.handle.clone(),
            t.meta.strides().to_vec().into(),
            t.meta.shape().to_vec().into(),
        )
    }
}

/// A new contiguous tensor of `shape` and `dtype` on `like`'s device (not
/// initialised: the kernels write every element).
pub(crate) fn output(like: &CubeTensor, shape: Vec<usize>, dtype: DType) -> CubeTensor {
    let n: usize = shape.iter().product();
    let client = like.client.clone();
    let handle = client.empty((n * dtype.size()).max(1));
    CubeTensor::new_contiguous(
        client,
        like.device.clone(),
        Shape::from(shape),
        handle,
        dtype,
    )
}

/// Values a unit of the elementwise kernels reads at once: 16 bytes on CUDA, at most 4
/// values elsewhere (wgpu's widest vector); fewer where `n` or a buffer's start is not
/// a multiple of the width.
fn vector_width(tensors: &[&CubeTensor], n: usize) -> usize {
    let bytes = tensors[0].dtype.size();
    let cap = match tensors[0].device {
        CubeDevice::Cuda(_) => 16 / bytes,
        _ => 4,
    };
    let aligned = |w: usize| {
        tensors.iter().all(|t| {
            let start = t.handle.offset_start.unwrap_or(0);
            start.is_multiple_of((w * bytes) as u64)
        })
    };
    [8, 4, 2, 1]
        .into_iter()
        .find(|&w| w <= cap && n.is_multiple_of(w) && aligned(w))
        .unwrap_or(1)
}

/// The vector width, the number of vectors and the grid of an elementwise kernel over
/// the `n` values of `tensors`.
fn elementwise_launch(tensors: &[&CubeTensor], n: usize) -> (usize, usize, CubeCount, CubeDim) {
    let width = vector_width(tensors, n);
    let vectors = n / width;
    let (count, dim) = grid(vectors.div_ceil(ELEMENTWISE_UNITS), ELEMENTWISE_UNITS);
    (width, vectors, count, dim)
}

/// A 2-D grid of `count` cubes (the y axis past 65,535).
pub(crate) fn grid(count: usize, units: usize) -> (CubeCount, CubeDim) {
    let count = count.max(1);
    let (x, y) = if count > 65535 {
        (65535, count.div_ceil(65535))
    } else {
        (count, 1)
    };
    (
        CubeCount::Static(x as u32, y as u32, 1),
        CubeDim::new_1d(units as u32),
    )
}

/// Launches `$kernel::<F>` with the float type of `$dtype`.
macro_rules! by_dtype {
    ($dtype:expr, $what:literal, $kernel:ident, $($args:expr),* $(,)?) => {
        match $dtype {
            DType::F32 => $kernel::launch::<f32>($($args),*),
            DType::F16 => $kernel::launch::<half::f16>($($args),*),
            DType::BF16 => $kernel::launch::<half::bf16>($($args),*),
            other => panic!("fused {}: unsupported dtype {other:?}", $what),
        }
    };
}

fn rope(x: CubeTensor, cos: CubeTensor, sin: CubeTensor, transpose: bool) -> CubeTensor {
    let client = x.client.clone();
    let shape = x.meta.shape().to_vec();
    let n: usize = shape.iter().product();
    let y = output(&x, shape, x.dtype);
    let (count, dim) = grid(n.div_ceil(ELEMENTWISE_UNITS), ELEMENTWISE_UNITS);
    by_dtype!(
        x.dtype,
        "RoPE",
        rope_kernel,
        &client,
        count,
        dim,
        arg(&x),
        arg(&cos),
        arg(&sin),
        arg(&y),
        transpose,
        ELEMENTWISE_UNITS,
    );
    y
}

impl FusedBackend for CubeBackend {
    fn fused_rms_norm(x: CubeTensor, gamma: CubeTensor, eps: f32) -> CubeTensor {
        let (x, gamma) = (into_contiguous(x), into_contiguous(gamma));
        let [rows, d] = [x.meta.shape()[0], x.meta.shape()[1]];
        let client = x.client.clone();
        let y = output(&x, vec![rows, d], x.dtype);
        let (count, dim) = grid(rows, ROW_UNITS);
        by_dtype!(
            x.dtype,
            "RMSNorm",
            rms_norm_kernel,
            &client,
            count,
            dim,
            arg(&x),
            arg(&gamma),
            arg(&y),
            rows as u32,
            d as u32,
            eps,
            ROW_UNITS,
        );
        y
    }

    fn fused_rms_norm_backward(
        x: CubeTensor,
        gamma: CubeTensor,
        dy: CubeTensor,
        eps: f32,
    ) -> (CubeTensor, CubeTensor) {
        let [x, gamma, dy] = [x, gamma, dy].map(into_contiguous);
        let [rows, d] = [x.meta.shape()[0], x.meta.shape()[1]];
        let client = x.client.clone();
        let dx = output(&x, vec![rows, d], x.dtype);
        let rows_share = output(&x, vec![rows, d], DType::F32);
        let (count, dim) = grid(rows, ROW_UNITS);
        by_dtype!(
            x.dtype,
            "RMSNorm backward",
            rms_norm_backward_kernel,
            &client,
            count,
            dim,
            arg(&x),
            arg(&gamma),
            arg(&dy),
            arg(&dx),
            arg(&rows_share),
            rows as u32,
            d as u32,
            eps,
            ROW_UNITS,
        );
        // gamma's gradient: the rows' shares summed (Burn's reduction), in gamma's dtype.
        (dx, sum_rows(rows_share, d, gamma.dtype))
    }

    fn fused_rope(x: CubeTensor, cos: CubeTensor, signed_sin: CubeTensor) -> CubeTensor {
        rope(x, cos, signed_sin, false)
    }

    fn fused_rope_transposed(
        dy: CubeTensor,
        cos: CubeTensor,
        signed_sin: CubeTensor,
    ) -> CubeTensor {
        rope(dy, cos, signed_sin, true)
    }

    fn fused_swiglu(gate: CubeTensor, up: CubeTensor) -> CubeTensor {
        let (gate, up) = (into_contiguous(gate), into_contiguous(up));
        let client = gate.client.clone();
        let shape = gate.meta.shape().to_vec();
        let n: usize = shape.iter().product();
        let y = output(&gate, shape, gate.dtype);
        let (width, vectors, count, dim) = elementwise_launch(&[&gate, &up], n);
        by_dtype!(
            gate.dtype,
            "SwiGLU",
            swiglu_kernel,
            &client,
            count,
            dim,
            width,
            arg(&gate),
            arg(&up),
            arg(&y),
            vectors as u32,
            ELEMENTWISE_UNITS,
        );
        y
    }

    fn fused_swiglu_backward(
        gate: CubeTensor,
        up: CubeTensor,
        dy: CubeTensor,
    ) -> (CubeTensor, CubeTensor) {
        let [gate, up, dy] = [gate, up, dy].map(into_contiguous);
        let client = gate.client.clone();
        let shape = gate.meta.shape().to_vec();
        let n: usize = shape.iter().product();
        let d_gate = output(&gate, shape.clone(), gate.dtype);
        let d_up = output(&gate, shape, gate.dtype);
        let (width, vectors, count, dim) = elementwise_launch(&[&gate, &up, &dy], n);
        by_dtype!(
            gate.dtype,
            "SwiGLU backward",
            swiglu_backward_kernel,
            &client,
            count,
            dim,
            width,
            arg(&gate),
            arg(&up),
            arg(&dy),
            arg(&d_gate),
            arg(&d_up),
            vectors as u32,
            ELEMENTWISE_UNITS,
        );
        (d_gate, d_up)
    }

    fn fused_layer_norm(
        x: CubeTensor,
        gamma: CubeTensor,
        beta: CubeTensor,
        eps: f32,
    ) -> CubeTensor {
        let [x, gamma, beta] = [x, gamma, beta].map(into_contiguous);
        let [rows, d] = [x.meta.shape()[0], x.meta.shape()[1]];
        let client = x.client.clone();
        let y = output(&x, vec![rows, d], x.dtype);
        let (count, dim) = grid(rows, ROW_UNITS);
        by_dtype!(
            x.dtype,
            "LayerNorm",
            layer_norm_kernel,
            &client,
            count,
            dim,
            arg(&x),
            arg(&gamma),
            arg(&beta),
            arg(&y),
            rows as u32,
            d as u32,
            eps,
            ROW_UNITS,
        );
        y
    }

    fn fused_layer_norm_backward(
        x: CubeTensor,
        gamma: CubeTensor,
        dy: CubeTensor,
        eps: f32,
    ) -> (CubeTensor, CubeTensor, CubeTensor) {
        let [x, gamma, dy] = [x, gamma, dy].map(into_contiguous);
        let [rows, d] = [x.meta.shape()[0], x.meta.shape()[1]];
        let client = x.client.clone();
        let cubes = rows.div_ceil(LAYER_NORM_BACKWARD_ROWS);
        let dx = output(&x, vec![rows, d], x.dtype);
        let dgamma_parts = output(&x, vec![cubes, d], DType::F32);
        let dbeta_parts = output(&x, vec![cubes, d], DType::F32);
        let (count, dim) = grid(cubes, ROW_UNITS);
        by_dtype!(
            x.dtype,
            "LayerNorm backward",
            layer_norm_backward_kernel,
            &client,
            count,
            dim,
            arg(&x),
            arg(&gamma),
            arg(&dy),
            arg(&dx),
            arg(&dgamma_parts),
            arg(&dbeta_parts),
            rows as u32,
            eps,
            ROW_UNITS,
            LAYER_NORM_BACKWARD_ROWS,
            d,
        );
        (
            dx,
            sum_rows(dgamma_parts, d, gamma.dtype),
            sum_rows(dbeta_parts, d, gamma.dtype),
        )
    }

    fn fused_gelu_tanh(x: CubeTensor) -> CubeTensor {
        let x = into_contiguous(x);
        let client = x.client.clone();
        let shape = x.meta.shape().to_vec();
        let n: usize = shape.iter().product();
        let y = output(&x, shape, x.dtype);
        let (width, vectors, count, dim) = elementwise_launch(&[&x], n);
        by_dtype!(
            x.dtype,
            "GELU",
            gelu_tanh_kernel,
            &client,
            count,
            dim,
            width,
            arg(&x),
            arg(&y),
            vectors as u32,
            ELEMENTWISE_UNITS,
        );
        y
    }

    fn fused_gelu_tanh_backward(x: CubeTensor, dy: CubeTensor) -> CubeTensor {
        let [x, dy] = [x, dy].map(into_contiguous);
        let client = x.client.clone();
        let shape = x.meta.shape().to_vec();
        let n: usize = shape.iter().product();
        let dx = output(&x, shape, x.dtype);
        let (width, vectors, count, dim) = elementwise_launch(&[&x, &dy], n);
        by_dtype!(
            x.dtype,
            "GELU backward",
            gelu_tanh_backward_kernel,
            &client,
            count,
            dim,
            width,
            arg(&x),
            arg(&dy),
            arg(&dx),
            vectors as u32,
            ELEMENTWISE_UNITS,
        );
        dx
    }

    fn fused_adamw(
        param: CubeTensor,
        grad: CubeTensor,
        m: CubeTensor,
        v: CubeTensor,
        fresh: bool,
        step: super::AdamWStep,
    ) -> (CubeTensor, CubeTensor, CubeTensor) {
        let [param, grad, m, v] = [param, grad, m, v].map(into_contiguous);
        let client = param.client.clone();
        let shape = param.meta.shape().to_vec();
        let n: usize = shape.iter().product();
        let param_out = output(&param, shape.clone(), param.dtype);
        let m_out = output(&param, shape.clone(), param.dtype);
        let v_out = output(&param, shape, param.dtype);
        let (width, vectors, count, dim) = elementwise_launch(&[&param, &grad, &m, &v], n);
        let [b1, one_b1, b2, one_b2, correct_1, correct_2, eps, keep, lr] = step.scalars();
        by_dtype!(
            param.dtype,
            "AdamW",
            adamw_kernel,
            &client,
            count,
            dim,
            width,
            arg(&param),
            arg(&grad),
            arg(&m),
            arg(&v),
            arg(&param_out),
            arg(&m_out),
            arg(&v_out),
            b1,
            one_b1,
            b2,
            one_b2,
            correct_1,
            correct_2,
            eps,
            keep,
            lr,
            u32::from(fresh),
            vectors as u32,
            ELEMENTWISE_UNITS,
        );
        (param_out, m_out, v_out)
    }
}
