//! Rotary position embeddings (Su et al. 2021) in the rotate-half layout of Hugging
//! Face's Qwen2, over arbitrary per-token positions (packed, shifted or sharded
//! sequences all carry their own position ids).

use burn::tensor::{DType, Device, Int, Tensor, TensorData};

/// Rotary position embedding tables for a batch of position ids, in the dtype of the
/// tensors they rotate ([`Rope::cast`]: once per forward, not once per layer).
#[derive(Debug, Clone)]
pub struct Rope {
    /// `cos(angle)` over both halves, `[batch, 1, seq, head_dim]`.
    pub cos: Tensor<4>,
    /// `sin(angle)` with the first half negated, `[batch, 1, seq, head_dim]`: the sign
    /// of rotate-half folded into the table, so that applying it swaps the halves
    /// and never negates.
    pub signed_sin: Tensor<4>,
}

impl Rope {
    /// `inv_freq[i] = theta^(-2i/d)`; angles `pos * inv_freq`, duplicated over both
    /// halves; the tables in f32 (see [`Rope::cast`]).
    ///
    /// # Shapes
    /// - position_ids: `[batch, seq]`
    pub fn new(position_ids: Tensor<2, Int>, head_dim: usize, theta: f64) -> Self {
        let inv_freq = Self::inv_freq(head_dim, theta, &position_ids.device());
        Self::from_inv_freq(position_ids, &inv_freq)
    }

    /// `inv_freq[i] = theta^(-2i/d)` for `i < d / 2`, f32 on `device`: the one host
    /// upload of [`Rope::new`], kept apart so that a device graph of a decoding step
    /// ([`Rope::from_inv_freq`] inside it) uploads nothing.
    pub fn inv_freq(head_dim: usize, theta: f64, device: &Device) -> Tensor<1> {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| (1.0 / theta.powf((2 * i) as f64 / head_dim as f64)) as f32)
            .collect();
        Tensor::<1>::from_data(TensorData::new(inv_freq, [half]), (device, DType::F32))
    }

    /// [`Rope::new`] from the table of [`Rope::inv_freq`]: device operations only.
    pub fn from_inv_freq(position_ids: Tensor<2, Int>, inv_freq: &Tensor<1>) -> Self {
        let [batch, seq] = position_ids.dims();
        let [half] = inv_freq.dims();
        // Angles in f32 whatever the model dtype: bf16 cannot even represent positions > 256.
        let inv_freq = inv_freq.clone().reshape([1, 1, half]);
        let positions = position_ids
            .float()
            .cast(DType::F32)
            .reshape([batch, seq, 1]);
        let angles = positions * inv_freq; // [B, S, half]
        let sin = angles.clone().sin();
        Rope {
            cos: Tensor::cat(vec![angles.clone(), angles], 2)
                .cos()
                .unsqueeze_dim::<4>(1),
            signed_sin: Tensor::cat(vec![sin.clone().neg(), sin], 2).unsqueeze_dim::<4>(1),
        }
    }

    /// The tables in `dtype` (rounded once; [`Rope::apply`] would otherwise round them
    /// in every layer, with the same result).
    pub fn cast(self, dtype: DType) -> Self {
        Rope {
            cos: self.cos.cast(dtype),
            signed_sin: self.signed_sin.cast(dtype),
        }
    }

    /// `x cos + rotate_half(x) sin`, where `rotate_half([x1, x2]) = [-x2, x1]`.
    ///
    /// # Shapes
    /// - x, output: `[batch, heads, seq, head_dim]`
    pub fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        // One fused kernel (backward: the transposed rotation) where it can run (a
        // CubeCL device); the same formula in Burn's ops elsewhere.
        #[cfg(any(feature = "flash-cuda", feature = "flash-wgpu"))]
        if let Some(y) = longview_kernels::fused::rope(x.clone(), &self.cos, &self.signed_sin) {
            return y;
        }
        let dtype = x.dtype();
        x.clone() * self.cos.clone().cast(dtype)
            + swap_halves(x) * self.signed_sin.clone().cast(dtype)
    }
}

/// `[x1, x2] -> [x2, x1]` over the last dimension.
fn swap_halves(x: Tensor<4>) -> Tensor<4> {
    let [b, h, s, d] = x.dims();
    let x1 = x.clone().slice([0..b, 0..h, 0..s, 0..d / 2]);
    let x2 = x.slice([0..b, 0..h, 0..s, d / 2..d]);
    Tensor::cat(vec![x2, x1], 3)
}
