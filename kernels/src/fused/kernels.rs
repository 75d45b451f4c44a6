//! The fused kernels themselves (CubeCL). Arithmetic in f32, each output rounded
//! once to the tensor's dtype. Row kernels take one cube per row on a 2-D grid;
//! elementwise kernels one unit per element on a 2-D grid.

use cubecl::prelude::*;

/// The cube's row on a 2-D grid of cubes.
#[cube]
pub(super) fn grid_row() -> usize {
    (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize
}

/// Sums `partial[0..units]` into `partial[0]` (every unit of the cube calls it).
#[cube]
#[allow(clippy::assign_op_pattern)] // written as the expansion the kernel compiles to
pub(super) fn cube_sum(partial: &mut Shared<[f32]>) {
    let u = UNIT_POS_X as usize;
    let mut stride = CUBE_DIM_X as usize / 2;
    while stride > 0 {
        if u < stride {
            partial[u] = partial[u] + partial[u + stride];
        }
        sync_cube();
        stride /= 2;
    }
}

/// `y = x / sqrt(mean(x^2) + eps) * gamma` over the last dimension. `x`, `y`
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
    let row = grid_row();
    let u = UNIT_POS_X as usize;
    let d = d as usize;
    let mut partial = Shared::<[f32]>::new_slice(units);
    let mut sum = 0.0f32;
    if row < rows as usize {
        let mut i = u;
        while i < d {
            let v = f32::cast_from(x[row * d + i]);
            sum += v * v;
            i += units;
        }
    }
    partial[u] = sum;
    sync_cube();
    cube_sum(&mut partial);
    if row < rows as usize {
        let inv = 1.0f32 / (partial[0] / f32::cast_from(d) + eps).sqrt();
        let mut i = u;
        while i < d {
            let at = row * d + i;
            y[at] = F::cast_from(f32::cast_from(x[at]) * inv * f32::cast_from(gamma[i]));
            i += units;
        }
    }
}

/// RMSNorm's backward for one row: with `r = 1 / sqrt(mean(x^2) + eps)`,
/// `dx_i = r g_i dy_i - x_i r^3 sum_j(dy_j g_j x_j) / d`, and each row's share of
/// gamma's gradient `dgamma_rows[row, i] = dy_i x_i r` (f32; the caller sums the rows).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_backward_kernel<F: Float>(
    x: &Tensor<F>,
    gamma: &Tensor<F>,
    dy: &Tensor<F>,
    dx: &mut Tensor<F>,
    dgamma_rows: &mut Tensor<f32>,
    rows: u32,
    d: u32,
    eps: f32,
    #[comptime] units: usize,
) {
    let row = grid_row();
    let u = UNIT_POS_X as usize;
    let d = d as usize;
    let mut squares = Shared::<[f32]>::new_slice(units);
    let mut dots = Shared::<[f32]>::new_slice(units);
    let mut sum = 0.0f32;
    let mut dot = 0.0f32;
    if row < rows as usize {
        let mut i = u;
        while i < d {
            let at = row * d + i;
            let v = f32::cast_from(x[at]);
            sum += v * v;
            dot += f32::cast_from(dy[at]) * f32::cast_from(gamma[i]) * v;
            i += units;
        }
    }
    squares[u] = sum;
    dots[u] = dot;
    sync_cube();
    cube_sum(&mut squares);
    cube_sum(&mut dots);
    if row < rows as usize {
        let inv = 1.0f32 / (squares[0] / f32::cast_from(d) + eps).sqrt();
        let coefficient = inv * inv * inv * dots[0] / f32::cast_from(d);
        let mut i = u;
        while i < d {
            let at = row * d + i;
            let v = f32::cast_from(x[at]);
            let g = f32::cast_from(dy[at]);
            dx[at] = F::cast_from(inv * f32::cast_from(gamma[i]) * g - v * coefficient);
            dgamma_rows[at] = g * v * inv;
            i += units;
        }
    }
}

/// Rotary embedding in the rotate-half layout:
/// `y[b, h, s, i] = x[b, h, s, i] cos[b', 0, s, i] + x[b, h, s, o(i)] sin[b', 0, s, i]`
/// (`o(i)`: the same place in the other half; `b' = 0` when the tables have one batch
/// row). `transpose` applies the transposed map (the backward:
/// `dx_i = dy_i cos_i + dy_o(i) sin_o(i)`). `x` and the tables at any strides; `y`
/// contiguous.
#[cube(launch)]
pub fn rope_kernel<F: Float>(
    x: &Tensor<F>,
    cos: &Tensor<F>,
    sin: &Tensor<F>,
    y: &mut Tensor<F>,
    #[comptime] transpose: bool,
    #[comptime] units: usize,
) {
    let pos = grid_row() * units + UNIT_POS_X as usize;
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
        let mut sin_at = i;
        if transpose {
            sin_at = other;
        }
        let at_c = tb * cos.stride(0) + s * cos.stride(2) + i * cos.stride(3);
        let at_s = tb * sin.stride(0) + s * sin.stride(2) + sin_at * sin.stride(3);
        y[pos] = F::cast_from(
            f32::cast_from(x[row + i * x.stride(3)]) * f32::cast_from(cos[at_c])
                + f32::cast_from(x[row + other * x.stride(3)]) * f32::cast_from(sin[at_s]),
        );
    }
}

/// `y = silu(gate) * up` elementwise (Qwen2's SwiGLU); all contiguous, one shape, read
/// and written `N` values at a time (`vectors` of them).
#[cube(launch)]
pub fn swiglu_kernel<F: Float, N: Size>(
    gate: &Tensor<Vector<F, N>>,
    up: &Tensor<Vector<F, N>>,
    y: &mut Tensor<Vector<F, N>>,
    vectors: u32,
    #[comptime] units: usize,
) {
    let pos = grid_row() * units + UNIT_POS_X as usize;
    if pos < vectors as usize {
        let width = gate.vector_size();
        let (g_v, u_v) = (gate[pos], up[pos]);
        let mut out = Vector::empty();
        #[unroll]
        for e in 0..width {
            let g = f32::cast_from(g_v.extract(e));
            let silu = g / (1.0f32 + (-g).exp());
            out.insert(e, F::cast_from(silu * f32::cast_from(u_v.extract(e))));
        }
        y[pos] = out;
    }
}

/// SwiGLU's backward: with `s = sigmoid(gate)`, `d_up = dy gate s` and
/// `d_gate = dy up s (1 + gate (1 - s))`; `N` values at a time.
#[cube(launch)]
pub fn swiglu_backward_kernel<F: Float, N: Size>(
    gate: &Tensor<Vector<F, N>>,
    up: &Tensor<Vector<F, N>>,
    dy: &Tensor<Vector<F, N>>,
    d_gate: &mut Tensor<Vector<F, N>>,
    d_up: &mut Tensor<Vector<F, N>>,
    vectors: u32,
    #[comptime] units: usize,
) {
    let pos = grid_row() * units + UNIT_POS_X as usize;
    if pos < vectors as usize {
        let width = gate.vector_size();
        let (g_v, u_v, dy_v) = (gate[pos], up[pos], dy[pos]);
        let mut out_gate = Vector::empty();
        let mut out_up = Vector::empty();
        #[unroll]
        for e in 0..width {
            let g = f32::cast_from(g_v.extract(e));
            let s = 1.0f32 / (1.0f32 + (-g).exp());
            let grad = f32::cast_from(dy_v.extract(e));
            out_up.insert(e, F::cast_from(grad * g * s));
            let up_e = f32::cast_from(u_v.extract(e));
            out_gate.insert(
                e,
                F::cast_from(grad * up_e * s * (1.0f32 + g * (1.0f32 - s))),
            );
        }
        d_gate[pos] = out_gate;
        d_up[pos] = out_up;
    }
}
