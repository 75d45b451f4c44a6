//! One AdamW update of a parameter tensor in one kernel launch: Burn's `AdamW::step`
//! (burn-optim 0.22, AMSGrad and cautious decay off) is about fifteen elementwise
//! launches a parameter, each a full pass over f32 tensors; this reads the parameter,
//! its gradient and both moments once and writes the three new tensors once.
//!
//! The update, in f32, for step `t` (1-based) with the moments `m`, `v` of step `t - 1`
//! (zero before the first):
//! `m' = b1 m + (1 - b1) g`, `v' = b2 v + (1 - b2) g^2`,
//! `p' = p (1 - lr wd) - lr (m' / (1 - b1^t)) / (sqrt(v' / (1 - b2^t)) + eps)`:
//! Burn's formula, each product and sum in the order Burn's ops apply them.

use cubecl::prelude::*;

use super::kernels::grid_row;

/// The scalars of one update ([`super::adamw_step`]).
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    pub lr: f64,
    pub beta_1: f32,
    pub beta_2: f32,
    pub epsilon: f32,
    pub weight_decay: f32,
    /// The step's number, from 1 (the bias corrections `1 - beta^time`).
    pub time: usize,
}

impl AdamWStep {
    /// The kernel's scalar arguments `[b1, 1 - b1, b2, 1 - b2, 1 - b1^t, 1 - b2^t, eps,
    /// 1 - lr wd, lr]`, rounded to f32 as Burn's scalar ops round them.
    pub(crate) fn scalars(&self) -> [f32; 9] {
        let t = self.time.min(i32::MAX as usize) as i32;
        let decay = self.lr * f64::from(self.weight_decay);
        [
            self.beta_1,
            1.0 - self.beta_1,
            self.beta_2,
            1.0 - self.beta_2,
            1.0 - self.beta_1.powi(t),
            1.0 - self.beta_2.powi(t),
            self.epsilon,
            (1.0 - decay) as f32,
            self.lr as f32,
        ]
    }
}

/// The update over `vectors` vectors of `N` f32 values: `param`, `grad`, `m`, `v` in,
/// `param_out`, `m_out`, `v_out` out (all contiguous, one shape); the scalars as
/// [`AdamWStep::scalars`] orders them (`keep = 1 - lr wd`, `correct_i = 1 - b_i^t`).
/// `fresh != 0`: no moments yet (`m` and `v` are not read; pass any tensor of the shape).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn adamw_kernel<F: Float, N: Size>(
    param: &Tensor<Vector<F, N>>,
    grad: &Tensor<Vector<F, N>>,
    m: &Tensor<Vector<F, N>>,
    v: &Tensor<Vector<F, N>>,
    param_out: &mut Tensor<Vector<F, N>>,
    m_out: &mut Tensor<Vector<F, N>>,
    v_out: &mut Tensor<Vector<F, N>>,
    b1: f32,
    one_b1: f32,
    b2: f32,
    one_b2: f32,
    correct_1: f32,
    correct_2: f32,
    eps: f32,
    keep: f32,
    lr: f32,
    fresh: u32,
    vectors: u32,
    #[comptime] units: usize,
) {
    let pos = grid_row() * units + UNIT_POS_X as usize;
    if pos < vectors as usize {
        let width = param.vector_size();
        let (p_v, g_v) = (param[pos], grad[pos]);
        let mut m_v = g_v;
        let mut v_v = g_v;
        if fresh == 0 {
            m_v = m[pos];
            v_v = v[pos];
        }
        let mut p_new = Vector::empty();
        let mut m_new = Vector::empty();
        let mut v_new = Vector::empty();
        #[unroll]
        for e in 0..width {
            let g = f32::cast_from(g_v.extract(e));
            let mut m1 = g * one_b1;
            let mut m2 = (g * g) * one_b2;
            if fresh == 0 {
                m1 += f32::cast_from(m_v.extract(e)) * b1;
                m2 += f32::cast_from(v_v.extract(e)) * b2;
            }
            let delta = (m1 / correct_1) / ((m2 / correct_2).sqrt() + eps);
            let p = f32::cast_from(p_v.extract(e));
            p_new.insert(e, F::cast_from(p * keep - delta * lr));
            m_new.insert(e, F::cast_from(m1));
            v_new.insert(e, F::cast_from(m2));
        }
        param_out[pos] = p_new;
        m_out[pos] = m_new;
        v_out[pos] = v_new;
    }
}
