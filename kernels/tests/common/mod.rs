//! What the flash-attention tests on a CubeCL runtime share: the wgpu client
//! (Mesa's lavapipe in CI), deterministic inputs, a case's geometry and mask, the f64
//! reference from `longview_kernels::reference`, and the forward+backward check.
#![allow(dead_code)]

use cubecl::Device;
use cubecl::device::WgpuDeviceKind;
use cubecl::prelude::*;
use longview_kernels::flash::{NO_KEYS, flash_backward, flash_forward_into};
pub use longview_kernels::reference::random_values as random;
use longview_kernels::reference::{AttentionF64, Geometry, attention_f64};
use longview_kernels::{DeviceTensor, FlashOptions};

pub fn client() -> Client {
    Device::wgpu(WgpuDeviceKind::DefaultDevice)
        .expect("a wgpu device (CI: Mesa lavapipe, `apt-get install mesa-vulkan-drivers`)")
        .client()
}

#[derive(Clone, Debug)]
pub struct Case {
    pub b: usize,
    pub hq: usize,
    pub hkv: usize,
    pub sq: usize,
    pub sk: usize,
    pub d: usize,
    pub options: FlashOptions,
}

impl Case {
    pub fn new(b: usize, hq: usize, hkv: usize, sq: usize, sk: usize, d: usize) -> Self {
        Case {
            b,
            hq,
            hkv,
            sq,
            sk,
            d,
            options: FlashOptions::new(d),
        }
    }
    pub fn with(mut self, f: impl FnOnce(FlashOptions) -> FlashOptions) -> Self {
        self.options = f(self.options);
        self
    }
    pub fn allowed(&self, i: usize, j: usize) -> bool {
        let o = &self.options;
        if o.causal && o.k_offset + j > o.q_offset + i {
            return false;
        }
        if let Some(cu) = &o.cu_seqlens {
            let seg = |p: usize| {
                cu.windows(2)
                    .position(|w| (w[0] as usize..w[1] as usize).contains(&p))
            };
            return seg(i) == seg(j);
        }
        true
    }
}

/// The definition, in f64 (`longview_kernels::reference`).
pub fn reference(c: &Case, q: &[f32], k: &[f32], v: &[f32], d_o: &[f32]) -> AttentionF64 {
    let geometry = Geometry {
        batch: c.b,
        q_heads: c.hq,
        kv_heads: c.hkv,
        q_len: c.sq,
        kv_len: c.sk,
        head_dim: c.d,
        scale: c.options.scale as f64,
        empty_lse: NO_KEYS as f64,
    };
    attention_f64(&geometry, q, k, v, Some(d_o), |_, i, j| c.allowed(i, j))
}

/// Max |got - want| relative to max(|want|, 1), asserted below `tol`.
pub fn assert_close(name: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let scale = want.iter().fold(1.0f64, |m, x| m.max(x.abs()));
    let mut worst = (0.0f64, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs() / scale;
        assert!(!g.is_nan(), "{name}[{i}] is NaN (never written?)");
        if err > worst.0 {
            worst = (err, i);
        }
    }
    assert!(
        worst.0 <= tol,
        "{name}: relative error {:.2e} at {} (got {}, want {}) exceeds {tol:.0e}",
        worst.0,
        worst.1,
        got[worst.1],
        want[worst.1]
    );
}

/// f32 tolerance relative to max(|ref|, 1): the kernels accumulate in f32 over at
/// most a few hundred terms.
pub const TOL_F32: f64 = 2e-5;

pub fn run_case(client: &Client, c: &Case, seed: u64) {
    let q = random(c.b * c.hq * c.sq * c.d, seed);
    let k = random(c.b * c.hkv * c.sk * c.d, seed + 1);
    let v = random(c.b * c.hkv * c.sk * c.d, seed + 2);
    let d_o = random(c.b * c.hq * c.sq * c.d, seed + 3);
    let want = reference(c, &q, &k, &v, &d_o);
    let qt = DeviceTensor::from_slice(client, &q, &[c.b, c.hq, c.sq, c.d]);
    let kt = DeviceTensor::from_slice(client, &k, &[c.b, c.hkv, c.sk, c.d]);
    let vt = DeviceTensor::from_slice(client, &v, &[c.b, c.hkv, c.sk, c.d]);
    let gt = DeviceTensor::from_slice(client, &d_o, &[c.b, c.hq, c.sq, c.d]);
    // Forward into NaN-poisoned outputs.
    let o = DeviceTensor::filled(client, f32::NAN, &[c.b, c.hq, c.sq, c.d]);
    let lse = DeviceTensor::filled(client, f32::NAN, &[c.b, c.hq, c.sq]);
    flash_forward_into::<f32>(client, &qt, &kt, &vt, &o, &lse, &c.options).unwrap();
    let label = format!("{c:?}");
    assert_close(
        &format!("O {label}"),
        &o.to_vec::<f32>(client).unwrap(),
        &want.o,
        TOL_F32,
    );
    let lse_got = lse.to_vec::<f32>(client).unwrap();
    for (i, (&g, &w)) in lse_got.iter().zip(&want.lse).enumerate() {
        if w <= NO_KEYS as f64 {
            assert_eq!(g, NO_KEYS, "LSE[{i}] of a row without keys {label}");
        } else {
            assert!(
                (g as f64 - w).abs() <= 1e-5 * w.abs().max(1.0),
                "LSE[{i}]: {g} vs {w} {label}"
            );
        }
    }
    // Backward (its outputs start as NaN inside flash_backward).
    let (dq, dk, dv) =
        flash_backward::<f32>(client, &qt, &kt, &vt, &o, &lse, &gt, &c.options).unwrap();
    assert_close(
        &format!("dQ {label}"),
        &dq.to_vec::<f32>(client).unwrap(),
        &want.dq,
        TOL_F32,
    );
    assert_close(
        &format!("dK {label}"),
        &dk.to_vec::<f32>(client).unwrap(),
        &want.dk,
        TOL_F32,
    );
    assert_close(
        &format!("dV {label}"),
        &dv.to_vec::<f32>(client).unwrap(),
        &want.dv,
        TOL_F32,
    );
}
