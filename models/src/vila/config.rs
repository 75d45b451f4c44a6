//! Internal configuration of the VILA-family model (vision encoder, projector, LLM).
//!
//! These are longview's own configs: what the modules need, with defaults, and the
//! named sizes of LongVILA (SigLIP so400m-patch14-384 + Qwen2-1.5B/7B, docs/algorithms.md section 8).
//! Hugging Face `config.json` files are parsed by [`crate::hf::config`] into these.

use burn::config::Config;

use crate::attention::AttentionImpl;

/// SigLIP-style ViT vision encoder.
#[derive(Config, Debug, PartialEq)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    /// Side of the square training resolution; other resolutions interpolate the
    /// position grid (bicubic, as SigLIP's `interpolate_pos_encoding`).
    pub image_size: usize,
    pub patch_size: usize,
    #[config(default = 3)]
    pub num_channels: usize,
    #[config(default = 1e-6)]
    pub layer_norm_eps: f64,
    #[config(default = "AttentionImpl::Reference")]
    pub attention: AttentionImpl,
}

impl VisionConfig {
    /// Patches per side at the training resolution.
    pub fn grid_side(&self) -> usize {
        self.image_size / self.patch_size
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// SigLIP so400m-patch14-384: hidden 1152, 27 layers, 16 heads (head dim 72), 729 patches.
    pub fn siglip_so400m_384() -> Self {
        Self::new(1152, 4304, 27, 16, 384, 14)
    }

    /// Tiny encoder for tests and the default commands.
    pub fn debug() -> Self {
        Self::new(32, 64, 3, 4, 40, 8)
    }
}

/// Projector type, as VILA's `mm_projector_type`.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum ProjectorKind {
    /// 2x2 space-to-depth (zero-padding odd grids), LayerNorm, Linear, GELU, Linear.
    MlpDownsample,
    /// Linear, GELU, Linear (`mlp2x_gelu`).
    Mlp2xGelu,
}

impl ProjectorKind {
    /// The token grid this projector makes of a `grid_h x grid_w` patch grid, before
    /// any pooling, in its output order: column blocks outermost for `mlp_downsample`
    /// (VILA's `flat_square`), rows outermost for `mlp2x_gelu`.
    pub fn token_grid(self, grid_h: usize, grid_w: usize) -> (usize, usize) {
        match self {
            ProjectorKind::MlpDownsample => (grid_w.div_ceil(2), grid_h.div_ceil(2)),
            ProjectorKind::Mlp2xGelu => (grid_h, grid_w),
        }
    }

    /// The name VILA writes in `mm_projector/config.json`.
    pub fn vila_name(self) -> &'static str {
        match self {
            ProjectorKind::MlpDownsample => "mlp_downsample",
            ProjectorKind::Mlp2xGelu => "mlp2x_gelu",
        }
    }

    pub fn from_vila_name(name: &str) -> Option<Self> {
        match name {
            "mlp_downsample" => Some(ProjectorKind::MlpDownsample),
            "mlp2x_gelu" => Some(ProjectorKind::Mlp2xGelu),
            _ => None,
        }
    }
}

/// Vision-to-language projector.
#[derive(Config, Debug, PartialEq)]
pub struct ProjectorConfig {
    pub kind: ProjectorKind,
    /// Width of the vision features (before any down-sampling).
    pub vision_hidden: usize,
    /// Width of the LLM embeddings.
    pub text_hidden: usize,
    /// torch.nn.LayerNorm's default epsilon.
    #[config(default = 1e-5)]
    pub layer_norm_eps: f64,
    /// Token budget for long videos: each frame's token grid average-pooled to
    /// `side x side` tokens after the projector (e.g. 8: 64 tokens a frame instead of
    /// 196); `None` keeps every token. Saved as `longview_token_pool` in
    /// `mm_projector/config.json`.
    #[config(default = "None")]
    pub token_pool: Option<usize>,
    /// Token budget over time: the visual tokens of every `k` consecutive frames of a
    /// video averaged into one frame's worth (LongVILA-R1's later code pools 8), after
    /// the projector and any `token_pool`. A video's last group is filled with copies
    /// of its last frame. `None` (or 1) keeps every frame. Saved as
    /// `longview_temporal_pool` in `mm_projector/config.json`.
    #[config(default = "None")]
    pub temporal_pool: Option<usize>,
}

impl ProjectorConfig {
    /// Visual tokens produced for a `grid_h x grid_w` patch grid.
    pub fn tokens_per_frame(&self, grid_h: usize, grid_w: usize) -> usize {
        if let Some(side) = self.token_pool {
            return side * side;
        }
        let (a, b) = self.kind.token_grid(grid_h, grid_w);
        a * b
    }
}

/// Qwen2-style decoder-only LLM.
#[derive(Config, Debug, PartialEq)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    #[config(default = 1e-6)]
    pub rms_norm_eps: f64,
    /// RoPE base (`rope_theta`); LongVILA's context extension raises it (15.3M at 131k).
    #[config(default = 1_000_000.0)]
    pub rope_theta: f64,
    #[config(default = false)]
    pub tie_word_embeddings: bool,
    #[config(default = 32768)]
    pub max_position_embeddings: usize,
    #[config(default = "AttentionImpl::Reference")]
    pub attention: AttentionImpl,
    /// Random initialisation as Qwen2's (`initializer_range`): every Linear weight and
    /// the embedding table drawn from N(0, std^2), biases zero, so a random model's
    /// first loss is about ln(vocab). `None`: Burn's defaults (uniform +-1/sqrt(fan_in)
    /// weights and biases, N(0, 1) embeddings), kept for the debug model whose
    /// default-run numbers in the README were measured with them.
    #[config(default = "None")]
    pub initializer_range: Option<f64>,
}

impl TextConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Qwen2-1.5B: hidden 1536, 28 layers, 12 q / 2 kv heads, tied embeddings.
    pub fn qwen2_1_5b() -> Self {
        Self::new(151_936, 1536, 8960, 28, 12, 2)
            .with_tie_word_embeddings(true)
            .with_initializer_range(Some(0.02))
    }

    /// Qwen2-7B: hidden 3584, 28 layers, 28 q / 4 kv heads.
    pub fn qwen2_7b() -> Self {
        Self::new(152_064, 3584, 18_944, 28, 28, 4).with_initializer_range(Some(0.02))
    }

    /// Tiny LLM for tests and the default commands.
    pub fn debug() -> Self {
        Self::new(300, 64, 96, 2, 4, 2).with_rope_theta(10_000.0)
    }

    /// Checks the head arithmetic; every constructor path calls this.
    pub fn validate(&self) -> Result<(), String> {
        if self.num_heads == 0 || !self.hidden_size.is_multiple_of(self.num_heads) {
            return Err(format!(
                "hidden_size ({}) must be a multiple of num_attention_heads ({})",
                self.hidden_size, self.num_heads
            ));
        }
        if self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(format!(
                "num_key_value_heads ({}) must divide num_attention_heads ({})",
                self.num_kv_heads, self.num_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!(
                "head dim {} must be even for rotate-half RoPE",
                self.head_dim()
            ));
        }
        Ok(())
    }
}

/// Which vision features feed the projector (VILA's `mm_vision_select_layer`).
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum VisionFeature {
    /// Output of the last layer after the post-layernorm.
    Last,
    /// Output of encoder layer `num_layers + k` for a negative `k` (no post-layernorm):
    /// `-2` is LongVILA's choice (the second-to-last layer).
    Layer(i32),
}

/// The whole vision-language model.
#[derive(Config, Debug, PartialEq)]
pub struct VlmConfig {
    pub vision: VisionConfig,
    pub projector: ProjectorConfig,
    pub text: TextConfig,
    #[config(default = "VisionFeature::Layer(-2)")]
    pub vision_feature: VisionFeature,
    /// Token id marking one visual-token slot in the input ids (`<image>`/`<video>`
    /// expanded to one id per visual token, see [`crate::vila::expand_visual_placeholders`]).
    pub placeholder_token_id: u32,
    /// Ids at or past this one are never generated: the rows of the LLM's vocabulary
    /// that the tokenizer has no token for (a random 1.5B/7B model run with a smaller
    /// tokenizer, or Qwen2's padded embedding rows). `None`: every id but the visual
    /// placeholder can be generated.
    #[config(default = "None")]
    pub generation_vocab: Option<usize>,
}

impl VlmConfig {
    /// Debug VLM: 3-layer 32-wide SigLIP at 40x40 (5x5 patches, 9 tokens a frame after
    /// mlp_downsample) and a 2-layer 64-wide Qwen2 with a 300-token vocabulary.
    pub fn debug() -> Self {
        let vision = VisionConfig::debug();
        let text = TextConfig::debug();
        let projector = ProjectorConfig::new(
            ProjectorKind::MlpDownsample,
            vision.hidden_size,
            text.hidden_size,
        );
        Self::new(vision, projector, text, 299)
    }

    /// Small VLM for CPU training runs: the debug shapes doubled in width (64-wide
    /// 3-layer SigLIP at 40x40, 9 tokens a frame; 128-wide 2-layer Qwen2), about 1M
    /// parameters with a 1024-token vocabulary.
    pub fn small() -> Self {
        let vision = VisionConfig::new(64, 128, 3, 4, 40, 8);
        let text = TextConfig::new(300, 128, 256, 2, 4, 2).with_rope_theta(10_000.0);
        let projector = ProjectorConfig::new(
            ProjectorKind::MlpDownsample,
            vision.hidden_size,
            text.hidden_size,
        );
        Self::new(vision, projector, text, 299)
    }

    /// LongVILA with Qwen2-1.5B (`<image>` is id 151646 in VILA's Qwen2 tokenizer).
    pub fn longvila_1_5b() -> Self {
        Self::longvila(TextConfig::qwen2_1_5b())
    }

    /// LongVILA with Qwen2-7B.
    pub fn longvila_7b() -> Self {
        Self::longvila(TextConfig::qwen2_7b())
    }

    fn longvila(text: TextConfig) -> Self {
        let vision = VisionConfig::siglip_so400m_384();
        let projector = ProjectorConfig::new(
            ProjectorKind::MlpDownsample,
            vision.hidden_size,
            text.hidden_size,
        );
        Self::new(vision, projector, text, 151_646)
    }

    /// Looks a named size up: `debug`, `small`, `1.5b`, `7b`.
    pub fn named(name: &str) -> Option<Self> {
        match name {
            "debug" => Some(Self::debug()),
            "small" => Some(Self::small()),
            "1.5b" | "longvila-1.5b" => Some(Self::longvila_1_5b()),
            "7b" | "longvila-7b" => Some(Self::longvila_7b()),
            _ => None,
        }
    }

    /// Visual tokens per frame at the vision encoder's training resolution (per
    /// pooled group of frames under `projector.temporal_pool`).
    pub fn tokens_per_frame(&self) -> usize {
        let side = self.vision.grid_side();
        self.projector.tokens_per_frame(side, side)
    }

    /// Frames averaged into one frame's tokens (`projector.temporal_pool`, 1 when
    /// off).
    pub fn temporal_pool(&self) -> usize {
        self.projector.temporal_pool.unwrap_or(1).max(1)
    }

    /// Frames' worth of visual tokens a video of `frames` frames becomes: one per
    /// group of [`VlmConfig::temporal_pool`] frames (the last group may be short). A
    /// video's placeholders are `visual_frames(frames) x tokens_per_frame()`.
    pub fn visual_frames(&self, frames: usize) -> usize {
        frames.div_ceil(self.temporal_pool())
    }
}
