//! Vision-to-language projectors of VILA (`llava/model/multimodal_projector`).
//!
//! `mlp_downsample` (LongVILA's choice) concatenates each 2x2 block of patch features
//! (space-to-depth, zero-padding an odd grid: 27x27 -> 28x28 -> 196 tokens for SigLIP
//! so400m-384), then applies LayerNorm, Linear, GELU, Linear. The token order follows
//! VILA's `DownSampleBlock.flat_square` exactly (column-block major), because trained
//! checkpoints depend on it. `mlp2x_gelu` is Linear, GELU, Linear on every patch.
//!
//! GELU here is the exact (erf) form, as `torch.nn.GELU()` in VILA.

use crate::linear::linear;
use burn::module::Module;
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::gelu;
use burn::tensor::module::adaptive_avg_pool2d;
use burn::tensor::{Device, Tensor};

use super::config::{ProjectorConfig, ProjectorKind};

/// Projector module; `norm` exists for `mlp_downsample` only.
#[derive(Module, Debug)]
pub struct Projector {
    pub norm: Option<LayerNorm>,
    pub linear_1: Linear,
    pub linear_2: Linear,
    #[module(skip)]
    pub kind: ProjectorKind,
    /// Pool each frame's token grid to `side x side` tokens (the token budget).
    #[module(skip)]
    pub token_pool: Option<usize>,
    /// Average every `k` consecutive frames' tokens (the token budget over time).
    #[module(skip)]
    pub temporal_pool: Option<usize>,
}

impl ProjectorConfig {
    pub fn init(&self, device: &Device) -> Projector {
        let (norm, input) = match self.kind {
            ProjectorKind::MlpDownsample => {
                let d = self.vision_hidden * 4;
                let norm = LayerNormConfig::new(d)
                    .with_epsilon(self.layer_norm_eps)
                    .init(device);
                (Some(norm), d)
            }
            ProjectorKind::Mlp2xGelu => (None, self.vision_hidden),
        };
        Projector {
            norm,
            linear_1: LinearConfig::new(input, self.text_hidden).init(device),
            linear_2: LinearConfig::new(self.text_hidden, self.text_hidden).init(device),
            kind: self.kind,
            token_pool: self.token_pool,
            temporal_pool: self.temporal_pool,
        }
    }
}

impl Projector {
    /// Projects the patch features of each frame to LLM embeddings, then applies the
    /// token budgets (`token_pool` per frame, `temporal_pool` over consecutive
    /// frames: the frames given are taken as one video, or as whole groups of
    /// `temporal_pool` frames of several).
    ///
    /// # Shapes
    /// - features: `[frames, grid_h * grid_w, vision_hidden]` (row-major patches)
    /// - output: `[ceil(frames / temporal_pool), tokens_per_frame, text_hidden]`
    pub fn forward(&self, features: Tensor<3>, grid: (usize, usize)) -> Tensor<3> {
        let x = match self.kind {
            ProjectorKind::MlpDownsample => {
                let x = space_to_depth_2x2(features, grid);
                self.norm
                    .as_ref()
                    .expect("mlp_downsample projector has a LayerNorm")
                    .forward(x)
            }
            ProjectorKind::Mlp2xGelu => features,
        };
        let tokens = linear(&self.linear_2, gelu(linear(&self.linear_1, x)));
        let tokens = match self.token_pool {
            Some(side) => pool_tokens(tokens, self.kind.token_grid(grid.0, grid.1), side),
            None => tokens,
        };
        match self.temporal_pool {
            Some(k) if k > 1 => pool_frames(tokens, k),
            _ => tokens,
        }
    }
}

/// Averages every `k` consecutive frames' tokens into one (frames `0..k`, `k..2k`,
/// ...); a last group shorter than `k` is filled with copies of the last frame first,
/// as a video padded to a multiple of `k` by repeating its last frame would be.
///
/// # Shapes
/// - tokens: `[frames, per_frame, hidden]`; output: `[ceil(frames / k), per_frame, hidden]`
pub fn pool_frames(tokens: Tensor<3>, k: usize) -> Tensor<3> {
    let [frames, per_frame, hidden] = tokens.dims();
    let k = k.max(1);
    if k == 1 || frames == 0 {
        return tokens;
    }
    let groups = frames.div_ceil(k);
    let missing = groups * k - frames;
    let tokens = if missing > 0 {
        let last = tokens
            .clone()
            .narrow(0, frames - 1, 1)
            .expand([missing, per_frame, hidden]);
        Tensor::cat(vec![tokens, last], 0)
    } else {
        tokens
    };
    tokens
        .reshape([groups, k, per_frame, hidden])
        .mean_dim(1)
        .reshape([groups, per_frame, hidden])
}

/// Average-pools each frame's `a x b` token grid (in the projector's output order) to
/// `side x side` tokens (adaptive average pooling: cell boundaries at
/// `floor(i * a / side)` .. `ceil((i + 1) * a / side)`), keeping the order convention.
///
/// # Shapes
/// - tokens: `[frames, a * b, hidden]`; output: `[frames, side * side, hidden]`
pub fn pool_tokens(tokens: Tensor<3>, (a, b): (usize, usize), side: usize) -> Tensor<3> {
    let [frames, count, hidden] = tokens.dims();
    assert_eq!(
        count,
        a * b,
        "projector: {count} tokens do not form a {a}x{b} grid"
    );
    let x = tokens.reshape([frames, a, b, hidden]).permute([0, 3, 1, 2]);
    adaptive_avg_pool2d(x, [side, side])
        .permute([0, 2, 3, 1])
        .reshape([frames, side * side, hidden])
}

/// VILA's `flat_square`: pads odd sides with zeros, then merges 2x2 patch blocks.
///
/// Output token `(j, i)` (index `j * rows/2 + i`, i.e. column blocks outermost) holds
/// the channels of patches `[(2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1)]` (row, col).
///
/// # Shapes
/// - features: `[frames, rows * cols, c]`
/// - output: `[frames, ceil(rows/2) * ceil(cols/2), 4c]`
pub fn space_to_depth_2x2(features: Tensor<3>, (rows, cols): (usize, usize)) -> Tensor<3> {
    let [frames, tokens, c] = features.dims();
    assert_eq!(
        tokens,
        rows * cols,
        "projector: {tokens} patch tokens do not form a {rows}x{cols} grid"
    );
    let mut x = features.reshape([frames, rows, cols, c]);
    let (mut a, mut b) = (rows, cols);
    if a % 2 == 1 {
        let pad = Tensor::zeros([frames, 1, b, c], &x.device());
        x = Tensor::cat(vec![x, pad], 1);
        a += 1;
    }
    if b % 2 == 1 {
        let pad = Tensor::zeros([frames, a, 1, c], &x.device());
        x = Tensor::cat(vec![x, pad], 2);
        b += 1;
    }
    x.reshape([frames, a, b / 2, 2 * c])
        .swap_dims(1, 2)
        .reshape([frames, (b / 2) * (a / 2), 4 * c])
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    /// The space-to-depth of an odd 3x5 grid against the index formula of the docs.
    #[test]
    fn space_to_depth_follows_vila_order_and_pads_odd_grids() {
        let device = Device::flex();
        let (rows, cols, c) = (3usize, 5usize, 2usize);
        let values: Vec<f32> = (0..rows * cols * c).map(|i| i as f32 + 1.0).collect();
        let x = Tensor::<3>::from_data(
            TensorData::new(values.clone(), [1, rows * cols, c]),
            &device,
        );
        let out = space_to_depth_2x2(x, (rows, cols));
        assert_eq!(out.dims(), [1, 2 * 3, 4 * c]);
        let out = out.try_into_vec_as::<f32>().unwrap();
        let patch = |r: usize, col: usize, ch: usize| {
            if r < rows && col < cols {
                values[(r * cols + col) * c + ch]
            } else {
                0.0
            }
        };
        let (a2, b2) = (2, 3); // padded 4x6 -> 2 row blocks, 3 column blocks
        for j in 0..b2 {
            for i in 0..a2 {
                let token = j * a2 + i;
                let sources = [
                    (2 * i, 2 * j),
                    (2 * i, 2 * j + 1),
                    (2 * i + 1, 2 * j),
                    (2 * i + 1, 2 * j + 1),
                ];
                for (s, (r, col)) in sources.iter().enumerate() {
                    for ch in 0..c {
                        assert_eq!(
                            out[token * 4 * c + s * c + ch],
                            patch(*r, *col, ch),
                            "token {token} slot {s}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn temporal_pooling_averages_consecutive_frames_and_repeats_the_last() {
        let device = Device::flex();
        // 5 frames of 2 tokens x 1 channel: frame f, token t holds 10 f + t.
        let values: Vec<f32> = (0..5)
            .flat_map(|f| (0..2).map(move |t| (10 * f + t) as f32))
            .collect();
        let x = Tensor::<3>::from_data(TensorData::new(values, [5, 2, 1]), &device);
        let out = pool_frames(x.clone(), 2);
        assert_eq!(out.dims(), [3, 2, 1]);
        // (0 + 10) / 2, (20 + 30) / 2, and frame 4 with a copy of itself.
        assert_eq!(
            out.try_into_vec_as::<f32>().unwrap(),
            vec![5.0, 6.0, 25.0, 26.0, 40.0, 41.0]
        );
        let out = pool_frames(x.clone(), 3);
        // (0 + 10 + 20) / 3 and (30 + 40 + 40) / 3.
        let got = out.try_into_vec_as::<f32>().unwrap();
        let want = [10.0, 11.0, 110.0 / 3.0, 113.0 / 3.0];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{got:?}");
        }
        assert_eq!(pool_frames(x.clone(), 1).dims(), [5, 2, 1]);
        assert_eq!(pool_frames(x, 8).dims(), [1, 2, 1]);
    }

    #[test]
    fn token_pooling_averages_blocks_of_the_token_grid() {
        let device = Device::flex();
        // One frame, a 4x4 grid, hidden 2: token k holds (k, -k).
        let values: Vec<f32> = (0..16).flat_map(|k| [k as f32, -(k as f32)]).collect();
        let tokens =
            Tensor::<3>::from_data(burn::tensor::TensorData::new(values, [1, 16, 2]), &device);
        let pooled = pool_tokens(tokens.clone(), (4, 4), 2)
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap();
        // Block (0, 0) = tokens 0, 1, 4, 5: mean 2.5; (0, 1): 2, 3, 6, 7 -> 4.5; (1, 0):
        // 8, 9, 12, 13 -> 10.5; (1, 1) -> 12.5.
        assert_eq!(pooled, vec![2.5, -2.5, 4.5, -4.5, 10.5, -10.5, 12.5, -12.5]);
        // Pooling to the grid's own size changes nothing.
        let same = pool_tokens(tokens.clone(), (4, 4), 4);
        assert_eq!(
            same.into_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .unwrap(),
            tokens
                .into_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .unwrap()
        );
    }
}
