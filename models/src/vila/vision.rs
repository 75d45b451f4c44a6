//! SigLIP vision transformer (Zhai et al. 2023), as `SiglipVisionModel` in Hugging Face
//! transformers: non-overlapping patch embedding, learned position embeddings (bicubic
//! interpolation to other grids), pre-norm encoder layers with a GELU(tanh) MLP and a
//! post-layernorm. VILA feeds the projector with the output of layer -2 instead of the
//! post-normed last layer; [`VisionFeature`] selects which.
//!
//! Field names mirror the Hugging Face parameter names so checkpoints map one to one.

use crate::linear::linear;
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::gelu_approximate;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use burn::tensor::{Device, Tensor};

use super::config::{VisionConfig, VisionFeature};
use crate::attention::{AttentionImpl, AttentionInput, AttentionMask, SplitAtAttention, attend};

/// Patch and position embeddings.
#[derive(Module, Debug)]
pub struct SiglipEmbeddings {
    /// `[hidden, channels, patch, patch]` convolution with stride `patch`.
    pub patch_embedding: Conv2d,
    /// `[grid_side^2, hidden]` learned positions of the training resolution.
    pub position_embedding: Embedding,
    #[module(skip)]
    pub patch_size: usize,
    #[module(skip)]
    pub grid_side: usize,
}

impl SiglipEmbeddings {
    /// # Shapes
    /// - pixels: `[frames, channels, height, width]`
    /// - output: `[frames, floor(height / patch) * floor(width / patch), hidden]`
    pub fn forward(&self, pixels: Tensor<4>) -> Tensor<3> {
        // Like the strided convolution of the reference, a size that is not a multiple
        // of the patch drops the remainder (SigLIP so400m: 384 px / 14 px = 27 patches).
        let [_, _, height, width] = pixels.dims();
        let (gh, gw) = (height / self.patch_size, width / self.patch_size);
        // On CUDA bf16/f16: one cuBLASLt GEMM over the flattened patches (Burn's direct
        // convolution took seconds per step at 162 frames).
        let patches =
            match crate::linear::patch_embed(&self.patch_embedding, &pixels, self.patch_size) {
                Some(patches) => patches,
                None => {
                    let patches = self.patch_embedding.forward(pixels); // [F, hidden, gh, gw]
                    let [frames, hidden, gh, gw] = patches.dims();
                    patches.reshape([frames, hidden, gh * gw]).swap_dims(1, 2)
                }
            };
        patches + self.positions(gh, gw).unsqueeze_dim(0)
    }

    /// Position embeddings for a `gh x gw` grid.
    ///
    /// # Shapes
    /// - output: `[gh * gw, hidden]`
    pub fn positions(&self, gh: usize, gw: usize) -> Tensor<2> {
        let table = self.position_embedding.weight.val();
        if gh == self.grid_side && gw == self.grid_side {
            return table;
        }
        let [_, hidden] = table.dims();
        let side = self.grid_side;
        let grid = table.reshape([1, side, side, hidden]).permute([0, 3, 1, 2]);
        let mut options = InterpolateOptions::new(InterpolateMode::Bicubic);
        options.align_corners = false;
        options.output_size = Some([gh, gw]);
        interpolate(grid, options)
            .permute([0, 2, 3, 1])
            .reshape([gh * gw, hidden])
    }
}

/// Multi-head self-attention of one encoder layer.
#[derive(Module, Debug)]
pub struct SiglipAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    #[module(skip)]
    pub num_heads: usize,
    #[module(skip)]
    pub attention: AttentionImpl,
}

impl SiglipAttention {
    /// # Shapes
    /// - x, output: `[frames, tokens, hidden]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.project_out(attend(self.attention, self.qkv(x)))
    }

    /// The (full, unmasked) attention's inputs.
    ///
    /// # Shapes
    /// - x: `[frames, tokens, hidden]`
    pub fn qkv(&self, x: Tensor<3>) -> AttentionInput {
        let [frames, tokens, hidden] = x.dims();
        let head_dim = hidden / self.num_heads;
        let heads = |t: Tensor<3>| {
            t.reshape([frames, tokens, self.num_heads, head_dim])
                .swap_dims(1, 2)
        };
        AttentionInput {
            q: heads(linear(&self.q_proj, x.clone())),
            k: heads(linear(&self.k_proj, x.clone())),
            v: heads(linear(&self.v_proj, x)),
            mask: AttentionMask::Full,
            scale: (head_dim as f64).powf(-0.5),
        }
    }

    /// Heads merged, then the output projection.
    ///
    /// # Shapes
    /// - out: `[frames, heads, tokens, head_dim]`; output: `[frames, tokens, hidden]`
    pub fn project_out(&self, out: Tensor<4>) -> Tensor<3> {
        let [frames, heads, tokens, head_dim] = out.dims();
        let out = out
            .swap_dims(1, 2)
            .reshape([frames, tokens, heads * head_dim]);
        linear(&self.out_proj, out)
    }
}

#[derive(Module, Debug)]
pub struct SiglipMlp {
    pub fc1: Linear,
    pub fc2: Linear,
}

impl SiglipMlp {
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        linear(&self.fc2, gelu_tanh(linear(&self.fc1, x)))
    }
}

/// LayerNorm of `x` in one fused kernel (with its backward) where that can run (a
/// CubeCL device), else Burn's `LayerNorm` ops (the same formula).
fn layer_norm(norm: &LayerNorm, eps: f64, x: Tensor<3>) -> Tensor<3> {
    #[cfg(any(feature = "flash-cuda", feature = "flash-wgpu"))]
    if let Some(y) = longview_kernels::fused::layer_norm(
        x.clone(),
        norm.gamma.val(),
        norm.beta.as_ref().map(|b| b.val()),
        eps,
    ) {
        return y;
    }
    let _ = eps;
    norm.forward(x)
}

/// GELU's tanh approximation (SigLIP's `gelu_pytorch_tanh`) in one fused kernel (with
/// its backward) where that can run (as [`layer_norm`]), else Burn's ops.
fn gelu_tanh(x: Tensor<3>) -> Tensor<3> {
    #[cfg(any(feature = "flash-cuda", feature = "flash-wgpu"))]
    if let Some(y) = longview_kernels::fused::gelu_tanh(x.clone()) {
        return y;
    }
    gelu_approximate(x)
}

/// Pre-norm transformer layer: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.
#[derive(Module, Debug)]
pub struct SiglipEncoderLayer {
    pub self_attn: SiglipAttention,
    pub layer_norm1: LayerNorm,
    pub mlp: SiglipMlp,
    pub layer_norm2: LayerNorm,
    /// Both norms' epsilon (Burn's `LayerNorm` keeps its own private).
    #[module(skip)]
    pub layer_norm_eps: f64,
}

impl SiglipEncoderLayer {
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.forward_split(x, &())
    }
}

impl SplitAtAttention for SiglipEncoderLayer {
    type Context = ();

    fn attention_input(&self, x: Tensor<3>, _: &()) -> AttentionInput {
        self.self_attn
            .qkv(layer_norm(&self.layer_norm1, self.layer_norm_eps, x))
    }

    fn after_attention(&self, x: Tensor<3>, attention: Tensor<4>) -> Tensor<3> {
        let x = x + self.self_attn.project_out(attention);
        let normed = layer_norm(&self.layer_norm2, self.layer_norm_eps, x.clone());
        x + self.mlp.forward(normed)
    }

    fn attention_impl(&self) -> AttentionImpl {
        self.self_attn.attention
    }
}

#[derive(Module, Debug)]
pub struct SiglipEncoder {
    pub layers: Vec<SiglipEncoderLayer>,
}

/// The SigLIP vision tower (`SiglipVisionModel` without the pooling head).
#[derive(Module, Debug)]
pub struct SiglipVision {
    pub embeddings: SiglipEmbeddings,
    pub encoder: SiglipEncoder,
    pub post_layernorm: LayerNorm,
}

impl VisionConfig {
    pub fn init(&self, device: &Device) -> SiglipVision {
        let h = self.hidden_size;
        let ln = || {
            LayerNormConfig::new(h)
                .with_epsilon(self.layer_norm_eps)
                .init(device)
        };
        let linear = |i, o| LinearConfig::new(i, o).init(device);
        let layers = (0..self.num_layers)
            .map(|_| SiglipEncoderLayer {
                self_attn: SiglipAttention {
                    q_proj: linear(h, h),
                    k_proj: linear(h, h),
                    v_proj: linear(h, h),
                    out_proj: linear(h, h),
                    num_heads: self.num_heads,
                    attention: self.attention,
                },
                layer_norm1: ln(),
                mlp: SiglipMlp {
                    fc1: linear(h, self.intermediate_size),
                    fc2: linear(self.intermediate_size, h),
                },
                layer_norm2: ln(),
                layer_norm_eps: self.layer_norm_eps,
            })
            .collect();
        let side = self.grid_side();
        SiglipVision {
            embeddings: SiglipEmbeddings {
                patch_embedding: Conv2dConfig::new(
                    [self.num_channels, h],
                    [self.patch_size, self.patch_size],
                )
                .with_stride([self.patch_size, self.patch_size])
                .init(device),
                position_embedding: EmbeddingConfig::new(side * side, h).init(device),
                patch_size: self.patch_size,
                grid_side: side,
            },
            encoder: SiglipEncoder { layers },
            post_layernorm: ln(),
        }
    }
}

impl SiglipVision {
    pub fn num_layers(&self) -> usize {
        self.encoder.layers.len()
    }

    /// Encodes frames and returns the selected features.
    ///
    /// # Shapes
    /// - pixels: `[frames, channels, height, width]`, normalised as the encoder expects
    /// - output: `[frames, patches, hidden]`
    pub fn forward(&self, pixels: Tensor<4>, feature: VisionFeature) -> Tensor<3> {
        let layers = self.layers_to_run(feature);
        let mut x = self.embeddings.forward(pixels);
        for layer in &self.encoder.layers[..layers] {
            x = layer.forward(x);
        }
        match feature {
            VisionFeature::Last => self.post_layernorm.forward(x),
            VisionFeature::Layer(_) => x,
        }
    }

    /// How many encoder layers a feature needs (`Layer(-2)` skips the last one).
    pub fn layers_to_run(&self, feature: VisionFeature) -> usize {
        let n = self.num_layers();
        match feature {
            VisionFeature::Last => n,
            VisionFeature::Layer(k) => {
                assert!(
                    k < 0 && (-k) as usize <= n,
                    "vision feature layer {k} is out of range for {n} layers (use -1..=-{n})"
                );
                n + 1 - (-k) as usize
            }
        }
    }
}

/// Returns the patch grid `(rows, cols)` of an input size.
pub fn patch_grid(height: usize, width: usize, patch_size: usize) -> (usize, usize) {
    (height / patch_size, width / patch_size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vila::config::VisionConfig;

    #[test]
    fn sizes_that_are_not_patch_multiples_drop_the_remainder() {
        // As SigLIP so400m: 384 px with 14 px patches gives 27 x 27 patches.
        let config = VisionConfig::new(16, 32, 2, 2, 44, 8);
        assert_eq!(config.grid_side(), 5);
        let device = Device::flex();
        let model = config.init(&device);
        let pixels = Tensor::<4>::zeros([2, 3, 44, 44], &device);
        assert_eq!(
            model.forward(pixels, VisionFeature::Last).dims(),
            [2, 25, 16]
        );
        assert_eq!(VisionConfig::siglip_so400m_384().grid_side(), 27);
    }
}
