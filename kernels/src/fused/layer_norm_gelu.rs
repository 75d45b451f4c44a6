//! SigLIP's elementwise work as fused kernels: LayerNorm (forward, and a backward
//! that also sums gamma's and beta's gradients over blocks of rows) and the tanh
//! approximation of GELU (forward and backward). Burn runs LayerNorm as about ten
//! launches (mean, centre, square, mean, add, sqrt, divide, scale, shift) and the GELU
//! as eight (`powf`, scalar multiplies and adds, `tanh`), each a full pass over
//! `[frames x 729, 1152 or 4304]` activations (the CubeCL profile of the 1.5B step,
//! `benchmarks/gemm.md`, 2026-12-06). Arithmetic in f32, each output rounded once.

use cubecl::prelude::*;

use super::kernels::{cube_sum, grid_row};

/// sqrt(2 / pi), the tanh approximation's scale.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
/// The cubic term's coefficient of the tanh approximation.
const CUBIC: f32 = 0.044_715;

/// `tanh(u)` as `1 - 2 / (exp(2u) + 1)`: exactly +-1 where `exp` over- or underflows,
/// never NaN.
#[cube]
fn tanh_of(u: f32) -> f32 {
    1.0f32 - 2.0f32 / ((2.0f32 * u).exp() + 1.0f32)
}

/// GELU's tanh approximation of one value, in f32.
#[cube]
fn gelu_of(v: f32) -> f32 {
    0.5f32 * v * (1.0f32 + tanh_of(SQRT_2_OVER_PI * (v + CUBIC * v * v * v)))
}

/// Its derivative: with `t = tanh(k (x + c x^3))`,
/// `0.5 (1 + t) + 0.5 x (1 - t^2) k (1 + 3 c x^2)`.
#[cube]
fn gelu_slope(v: f32) -> f32 {
    let t = tanh_of(SQRT_2_OVER_PI * (v + CUBIC * v * v * v));
    0.5f32 * (1.0f32 + t)
        + 0.5f32 * v * (1.0f32 - t * t) * SQRT_2_OVER_PI * (1.0f32 + 3.0f32 * CUBIC * v * v)
}

/// `y = x / 2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))` elementwise (SigLIP's
/// `gelu_pytorch_tanh`); `x`, `y` contiguous, read and written `N` values at a time
/// (`vectors` of them).
#[cube(launch)]
pub fn gelu_tanh_kernel<F: Float, N: Size>(
    x: &Tensor<Vector<F, N>>,
    y: &mut Tensor<Vector<F, N>>,
    vectors: u32,
    #[comptime] units: usize,
) {
    let pos = grid_row() * units + UNIT_POS_X as usize;
    if pos < vectors as usize {
        let width = x.vector_size();
        let x_v = x[pos];
        let mut out = Vector::empty();
        #[unroll]
        for e in 0..width {
            out.insert(e, F::cast_from(gelu_of(f32::cast_from(x_v.extract(e)))));
        }
        y[pos] = out;
    }
}

/// The tanh GELU's backward, `dx = dy gelu'(x)`, `N` values at a time.
#[cube(launch)]
pub fn gelu_tanh_backward_kernel<F: Float, N: Size>(
    x: &Tensor<Vector<F, N>>,
    dy: &Tensor<Vector<F, N>>,
    dx: &mut Tensor<Vector<F, N>>,
    vectors: u32,
    #[comptime] units: usize,
) {
    let pos = grid_row() * units + UNIT_POS_X as usize;
    if pos < vectors as usize {
        let width = x.vector_size();
        let (x_v, dy_v) = (x[pos], dy[pos]);
        let mut out = Vector::empty();
        #[unroll]
        for e in 0..width {
            let slope = gelu_slope(f32::cast_from(x_v.extract(e)));
            out.insert(e, F::cast_from(f32::cast_from(dy_v.extract(e)) * slope));
        }
        dx[pos] = out;
    }
}

/// Mean and reciprocal standard deviation (biased variance, two passes) of row `row`
/// of `x` (`[rows, d]` contiguous), the same in every unit of the cube; every unit
/// calls it (it synchronises the cube), `live` false for a row past the end.
#[cube]
fn row_statistics<F: Float>(
    x: &Tensor<F>,
    row: usize,
    d: usize,
    eps: f32,
    live: bool,
    partial: &mut Shared<[f32]>,
    #[comptime] units: usize,
) -> (f32, f32) {
    let u = UNIT_POS_X as usize;
    let mut sum = 0.0f32;
    if live {
        let mut i = u;
        while i < d {
            sum += f32::cast_from(x[row * d + i]);
            i += units;
        }
    }
    partial[u] = sum;
    sync_cube();
    cube_sum(partial);
    let mean = partial[0] / f32::cast_from(d);
    sync_cube();
    let mut squares = 0.0f32;
    if live {
        let mut i = u;
        while i < d {
            let c = f32::cast_from(x[row * d + i]) - mean;
            squares += c * c;
            i += units;
        }
    }
    partial[u] = squares;
    sync_cube();
    cube_sum(partial);
    let rstd = 1.0f32 / (partial[0] / f32::cast_from(d) + eps).sqrt();
    sync_cube();
    (mean, rstd)
}

/// `y = (x - mean) / sqrt(var + eps) * gamma + beta` over the last dimension (biased
/// variance, as `torch.nn.LayerNorm`). `x`, `y` contiguous `[rows, d]`; `gamma`,
/// `beta` `[d]`. One cube a row.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_kernel<F: Float>(
    x: &Tensor<F>,
    gamma: &Tensor<F>,
    beta: &Tensor<F>,
    y: &mut Tensor<F>,
    rows: u32,
    d: u32,
    eps: f32,
    #[comptime] units: usize,
) {
    let row = grid_row();
    let d = d as usize;
    let live = row < rows as usize;
    let mut partial = Shared::<[f32]>::new_slice(units);
    let (mean, rstd) = row_statistics(x, row, d, eps, live, &mut partial, units);
    if live {
        let mut i = UNIT_POS_X as usize;
        while i < d {
            let at = row * d + i;
            let normed = (f32::cast_from(x[at]) - mean) * rstd;
            y[at] = F::cast_from(normed * f32::cast_from(gamma[i]) + f32::cast_from(beta[i]));
            i += units;
        }
    }
}

/// LayerNorm's backward over `rows_per_cube` consecutive rows a cube. With
/// `xhat = (x - mean) rstd` and `g = dy gamma`:
/// `dx = rstd (g - mean(g) - xhat mean(g xhat))`; the cube's sums over its rows of
/// `dy xhat` (gamma's gradient) and `dy` (beta's) go to row `cube` of `dgamma_part`
/// and `dbeta_part` (f32 `[cubes, d]`; the caller sums the cubes). `width` (comptime)
/// is `d`: the sums are kept in shared memory, each column by the one unit that owns it.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_backward_kernel<F: Float>(
    x: &Tensor<F>,
    gamma: &Tensor<F>,
    dy: &Tensor<F>,
    dx: &mut Tensor<F>,
    dgamma_part: &mut Tensor<f32>,
    dbeta_part: &mut Tensor<f32>,
    rows: u32,
    eps: f32,
    #[comptime] units: usize,
    #[comptime] rows_per_cube: usize,
    #[comptime] width: usize,
) {
    let cube = grid_row();
    let u = UNIT_POS_X as usize;
    let d = width;
    let mut partial = Shared::<[f32]>::new_slice(units);
    let mut partial_dot = Shared::<[f32]>::new_slice(units);
    let mut dgamma = Shared::<[f32]>::new_slice(width);
    let mut dbeta = Shared::<[f32]>::new_slice(width);
    let mut i = u;
    while i < d {
        dgamma[i] = 0.0f32;
        dbeta[i] = 0.0f32;
        i += units;
    }
    for r in 0..rows_per_cube {
        let row = cube * rows_per_cube + r;
        let live = row < rows as usize;
        let (mean, rstd) = row_statistics(x, row, d, eps, live, &mut partial, units);
        let mut sum_g = 0.0f32;
        let mut sum_gx = 0.0f32;
        if live {
            let mut i = u;
            while i < d {
                let at = row * d + i;
                let xhat = (f32::cast_from(x[at]) - mean) * rstd;
                let g = f32::cast_from(dy[at]) * f32::cast_from(gamma[i]);
                sum_g += g;
                sum_gx += g * xhat;
                i += units;
            }
        }
        partial[u] = sum_g;
        partial_dot[u] = sum_gx;
        sync_cube();
        cube_sum(&mut partial);
        cube_sum(&mut partial_dot);
        let mean_g = partial[0] / f32::cast_from(d);
        let mean_gx = partial_dot[0] / f32::cast_from(d);
        sync_cube();
        if live {
            let mut i = u;
            while i < d {
                let at = row * d + i;
                let xhat = (f32::cast_from(x[at]) - mean) * rstd;
                let grad = f32::cast_from(dy[at]);
                let g = grad * f32::cast_from(gamma[i]);
                dx[at] = F::cast_from(rstd * (g - mean_g - xhat * mean_gx));
                dgamma[i] += grad * xhat;
                dbeta[i] += grad;
                i += units;
            }
        }
    }
    let mut i = u;
    while i < d {
        dgamma_part[cube * d + i] = dgamma[i];
        dbeta_part[cube * d + i] = dbeta[i];
        i += units;
    }
}
