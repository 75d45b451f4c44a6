//! LoRA adapters on the LLM's attention projections (LongVILA stage 4 trains them,
//! with the embeddings and norms, to extend the context on long text).
//!
//! An adapter adds `scale * (x A) B` to a frozen `Linear`, with `A` `[in, rank]`
//! (Kaiming-uniform, as PEFT) and `B` `[rank, out]` (zeros, so a fresh adapter changes
//! nothing) and `scale = alpha / rank`. Merging folds `scale * A B` into the weight.

use crate::linear::linear;
use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Device, Tensor, TensorData};

/// One low-rank adapter.
#[derive(Module, Debug)]
pub struct Lora {
    /// `[in, rank]` (Burn's Linear layout; PEFT's `lora_A.weight` is its transpose).
    pub lora_a: Linear,
    /// `[rank, out]`.
    pub lora_b: Linear,
    #[module(skip)]
    pub scale: f64,
}

impl Lora {
    /// `A` is drawn from U(-1/sqrt(d_in), 1/sqrt(d_in)) (PEFT's Kaiming-uniform with
    /// a = sqrt(5)) by a generator seeded with `seed` on the host, so that every rank
    /// of a parallel run builds the same adapters whatever else uses the device RNG.
    pub fn new(
        d_in: usize,
        d_out: usize,
        rank: usize,
        alpha: f64,
        seed: u64,
        device: &Device,
    ) -> Self {
        let bound = 1.0 / (d_in as f64).sqrt();
        let mut state = seed;
        let values: Vec<f32> = (0..d_in * rank)
            .map(|_| {
                state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^= z >> 31;
                let u = (z >> 11) as f64 / (1u64 << 53) as f64;
                ((2.0 * u - 1.0) * bound) as f32
            })
            .collect();
        let mut lora_a = LinearConfig::new(d_in, rank).with_bias(false).init(device);
        lora_a.weight = Param::initialized(
            lora_a.weight.id,
            Tensor::from_data(TensorData::new(values, [d_in, rank]), device),
        );
        let lora_b = LinearConfig::new(rank, d_out)
            .with_bias(false)
            .with_initializer(burn::nn::Initializer::Zeros)
            .init(device);
        Lora {
            lora_a,
            lora_b,
            scale: alpha / rank as f64,
        }
    }

    /// # Shapes
    /// - x: `[batch, seq, in]`; output: `[batch, seq, out]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        linear(&self.lora_b, linear(&self.lora_a, x)).mul_scalar(self.scale)
    }

    /// `scale * A B`, `[in, out]` (the change of the adapted Linear's weight).
    pub fn delta(&self) -> Tensor<2> {
        self.lora_a
            .weight
            .val()
            .matmul(self.lora_b.weight.val())
            .mul_scalar(self.scale)
    }
}

/// Adapters of one attention block's q, k, v and o projections.
#[derive(Module, Debug)]
pub struct AttentionLora {
    pub q: Lora,
    pub k: Lora,
    pub v: Lora,
    pub o: Lora,
}

/// `weight + sign * delta` as a new parameter with `linear`'s id.
pub(super) fn shift(linear: Linear, delta: Tensor<2>, sign: f64) -> Linear {
    let Linear { weight, bias } = linear;
    let id = weight.id;
    let value = weight.val().detach() + delta.detach().mul_scalar(sign);
    Linear {
        weight: Param::initialized(id, value),
        bias,
    }
}
