//! The VLM's forward pass as named stages, in the order they run:
//!
//! 1. [`Vlm::vision_stem`]: patch and position embeddings of the frames.
//! 2. [`Vlm::vision_layers`]: the SigLIP encoder layers the configured feature needs
//!    (VILA reads layer -2, so the last layer is not run).
//! 3. [`Vlm::project`]: the post-layernorm where the feature is the last layer's, then
//!    the projector: one frame's visual tokens, as wide as the LLM.
//! 4. [`Vlm::embed_tokens`] and [`Vlm::splice`]: token embeddings with the visual
//!    tokens written over the placeholder rows.
//! 5. [`Vlm::text_layers`] with [`Vlm::text_context`] (the RoPE tables of the
//!    positions): the Qwen2 decoder layers.
//! 6. [`Vlm::logits`] (final norm + LM head), or the loss on chosen rows only
//!    ([`Vlm::next_token_loss_sum`], [`Vlm::shifted_loss_sum`]), or on given rows
//!    ([`Vlm::rows_loss_sum`], which the trainer calls on slices of the supervised
//!    rows, [`super::loss`]).
//!
//! Layers of both stacks implement [`SplitAtAttention`](crate::attention::SplitAtAttention),
//! so an executor can run them whole or around a kept attention output. [`Vlm::forward`]
//! is the plain run over these stages; activation recomputation, sequence parallelism
//! and chunked inference drive the same stages from outside, and never reach into the
//! modules' fields.

use burn::tensor::{Int, Tensor};

use super::config::TextConfig;
use super::text::{KvCache, Qwen2DecoderLayer, Rope};
use super::vision::{SiglipEncoderLayer, patch_grid};
use super::{VisionFeature, VisualInput, Vlm, splice_visual_tokens};
use crate::attention::AttentionImpl;
use crate::error::ModelError;

/// The patch grid `(rows, cols)` of a batch of frames.
pub type PatchGrid = (usize, usize);

impl Vlm {
    /// Stage 1: patch and position embeddings.
    ///
    /// # Shapes
    /// - pixels: `[frames, channels, height, width]`
    /// - output: `[frames, rows * cols, vision_hidden]`, and the grid `(rows, cols)`
    pub fn vision_stem(&self, pixels: Tensor<4>) -> (Tensor<3>, PatchGrid) {
        let [_, _, height, width] = pixels.dims();
        let grid = patch_grid(height, width, self.vision_tower.embeddings.patch_size);
        (self.vision_tower.embeddings.forward(pixels), grid)
    }

    /// Stage 2: the encoder layers the configured vision feature needs, in order.
    pub fn vision_layers(&self) -> &[SiglipEncoderLayer] {
        let layers = self.vision_tower.layers_to_run(self.vision_feature);
        &self.vision_tower.encoder.layers[..layers]
    }

    /// Stage 3: the encoder output to visual tokens (the post-layernorm when the
    /// feature is the last layer's, then the projector).
    ///
    /// # Shapes
    /// - features: `[frames, rows * cols, vision_hidden]`
    /// - output: `[frames, tokens_per_frame, text_hidden]`
    pub fn project(&self, features: Tensor<3>, grid: PatchGrid) -> Tensor<3> {
        let features = match self.vision_feature {
            VisionFeature::Last => self.vision_tower.post_layernorm.forward(features),
            VisionFeature::Layer(_) => features,
        };
        self.mm_projector.forward(features, grid)
    }

    /// Stages 1-3 on frames, or the given embeddings as they are.
    ///
    /// # Shapes
    /// - output: `[frames, tokens_per_frame, text_hidden]`
    pub fn visual_tokens(&self, visual: VisualInput) -> Option<Tensor<3>> {
        match visual {
            VisualInput::None => None,
            VisualInput::Pixels(pixels) => Some(self.encode_frames(pixels)),
            VisualInput::Embeddings(tokens) => Some(tokens),
        }
    }

    /// Stage 4a: token embeddings (placeholders included, to be overwritten).
    ///
    /// # Shapes
    /// - ids: `[batch, seq]`; output: `[batch, seq, text_hidden]`
    pub fn embed_tokens(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        self.llm.embed(ids)
    }

    /// Stage 4b: `text` with the visual tokens written over the placeholder rows of
    /// `ids`, in order. Errors when the counts differ.
    pub fn splice(
        &self,
        text: Tensor<3>,
        ids: &Tensor<2, Int>,
        visual: Option<Tensor<3>>,
    ) -> Result<Tensor<3>, ModelError> {
        splice_visual_tokens(text, ids, visual, self.placeholder_token_id)
    }

    /// What every text layer shares: the RoPE tables of `position_ids` (`[batch, seq]`,
    /// any per-token positions: packed, shifted or a sequence-parallel shard).
    pub fn text_context(&self, position_ids: Tensor<2, Int>) -> Rope {
        self.llm.rope(position_ids)
    }

    /// Stage 5: the decoder layers.
    pub fn text_layers(&self) -> &[Qwen2DecoderLayer] {
        self.llm.layers()
    }

    /// Stage 5 over new rows continuing `cache` (the prompt chunk by chunk, then one
    /// token at a time), extending the cache; returns the last layer's output (stage
    /// 6 not applied).
    ///
    /// # Shapes
    /// - embeds: `[batch, new, text_hidden]`; position_ids: `[batch, new]`
    pub fn text_layers_cached(
        &self,
        embeds: Tensor<3>,
        position_ids: Tensor<2, Int>,
        cache: &mut KvCache,
    ) -> Tensor<3> {
        self.llm.layers_cached(embeds, position_ids, cache)
    }

    /// The LLM's shape read off its weights (what memory estimates need; fields that
    /// no weight shows, like the RoPE base, are the module's own or defaults).
    pub fn text_shape(&self) -> TextConfig {
        let [vocab, hidden] = self.llm.model.embed_tokens.weight.dims();
        let layers = self.text_layers();
        let (intermediate, heads, kv_heads) = layers.first().map_or((0, 1, 1), |l| {
            let a = &l.self_attn;
            (
                l.mlp.gate_proj.weight.dims()[1],
                a.num_heads,
                a.num_kv_heads,
            )
        });
        TextConfig::new(vocab, hidden, intermediate, layers.len(), heads, kv_heads)
            .with_rope_theta(self.llm.rope_theta)
            .with_attention(self.text_attention())
    }

    /// The attention the text layers call (the same in every layer).
    pub fn text_attention(&self) -> AttentionImpl {
        self.llm.attention()
    }

    /// The attention the vision encoder's layers call.
    pub fn vision_attention(&self) -> AttentionImpl {
        self.vision_tower
            .encoder
            .layers
            .first()
            .map_or(AttentionImpl::Reference, |l| l.self_attn.attention)
    }

    /// Frames the projector averages into one frame's tokens (`temporal_pool`, 1 when
    /// off): callers that encode a video in pieces cut it at multiples of this.
    pub fn temporal_pool(&self) -> usize {
        self.mm_projector.temporal_pool.unwrap_or(1).max(1)
    }

    /// Stage 6: final norm and LM head.
    ///
    /// # Shapes
    /// - hidden: `[batch, seq, text_hidden]` (the last layer's output); output:
    ///   `[batch, seq, vocab]`
    pub fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        self.llm.head(hidden)
    }

    /// The logits tokens are generated from: [`Vlm::logits`] with the visual
    /// placeholder's column at [`MASKED_LOGIT`]. A sampled placeholder would be read
    /// back as a visual slot when the response is run again (GRPO's log-prob passes,
    /// a prompt that continues the conversation) and fail the placeholder count, so
    /// generation never emits it, and every log-prob of a generated token (the
    /// sampler's and the recomputed ones) is over the other tokens. The ids from
    /// [`Vlm::emittable_vocab`] on are masked too (no token of the tokenizer).
    pub fn generation_logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        let logits = mask_token(self.logits(hidden), self.placeholder_token_id);
        mask_from(logits, self.emittable_vocab())
    }

    /// Ids below this can be generated (all of the LLM's vocabulary unless
    /// [`Vlm::generation_vocab`] is smaller).
    pub fn emittable_vocab(&self) -> usize {
        let vocab = self.llm.vocab_size();
        self.generation_vocab.map_or(vocab, |n| n.min(vocab))
    }

    /// Stage 6 on the supervised rows only: the summed next-token cross entropy and the
    /// supervised count (see [`super::Qwen2::next_token_loss_sum`]).
    pub fn next_token_loss_sum(
        &self,
        hidden: Tensor<3>,
        labels: &Tensor<2, Int>,
    ) -> Result<(Tensor<1>, usize), ModelError> {
        self.llm.next_token_loss_sum(hidden, labels)
    }

    /// Like [`Vlm::next_token_loss_sum`] for targets already shifted (a
    /// sequence-parallel shard's).
    pub fn shifted_loss_sum(
        &self,
        hidden: Tensor<3>,
        targets: &Tensor<2, Int>,
    ) -> Result<(Tensor<1>, usize), ModelError> {
        self.llm.shifted_loss_sum(hidden, targets)
    }

    /// Stage 6 on given rows of the last layer's output: the summed cross entropy
    /// against one target per row (see [`super::loss`]).
    ///
    /// # Shapes
    /// - rows: `[n, text_hidden]`; output: `[1]` (f32)
    pub fn rows_loss_sum(&self, rows: Tensor<2>, targets: &[i64]) -> Tensor<1> {
        self.llm.rows_loss_sum(rows, targets)
    }

    /// Rows of one loss slice for this model's vocabulary
    /// ([`super::loss::loss_chunk_rows`]).
    pub fn loss_chunk_rows(&self) -> usize {
        super::loss::loss_chunk_rows(self.llm.model.embed_tokens.weight.dims()[0])
    }
}

/// The logit [`Vlm::generation_logits`] gives the visual placeholder: finite (so that
/// `p log p` stays 0 in an entropy) and far below any real logit, so its probability
/// is exactly 0 in f32 at any temperature the decoders accept.
pub const MASKED_LOGIT: f32 = -1.0e9;

/// `logits` (`[batch, rows, vocab]`) with the columns from `first` on set to
/// [`MASKED_LOGIT`].
pub fn mask_from(logits: Tensor<3>, first: usize) -> Tensor<3> {
    let [b, s, vocab] = logits.dims();
    if first >= vocab {
        return logits;
    }
    logits.slice_fill([0..b, 0..s, first..vocab], MASKED_LOGIT)
}

/// `logits` (`[batch, rows, vocab]`) with column `token` set to [`MASKED_LOGIT`]
/// (unchanged when `token` is past the vocabulary).
pub fn mask_token(logits: Tensor<3>, token: u32) -> Tensor<3> {
    let [b, s, vocab] = logits.dims();
    let token = token as usize;
    if token >= vocab {
        return logits;
    }
    logits.slice_fill([0..b, 0..s, token..token + 1], MASKED_LOGIT)
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Distribution, TensorData};

    use super::*;
    use crate::attention::{SplitAtAttention, attend};
    use crate::vila::{VlmConfig, VlmInput, default_position_ids};

    /// Every layer run as its two halves around a separate attention call, the way an
    /// executor drives the stages.
    fn split_run<L: SplitAtAttention>(
        layers: &[L],
        context: &L::Context,
        x: Tensor<3>,
    ) -> Tensor<3> {
        layers.iter().fold(x, |x, layer| {
            let input = layer.attention_input(x.clone(), context);
            layer.after_attention(x, attend(layer.attention_impl(), input))
        })
    }

    #[test]
    fn forward_equals_the_stage_by_stage_run() {
        let device = Device::flex();
        device.seed(7);
        let config = VlmConfig::debug();
        let model = config.init(&device);
        let per_frame = config.tokens_per_frame();
        let side = config.vision.image_size;
        let frames = 2;
        let placeholder = model.placeholder_token_id as i64;
        // Text, two frames' placeholders, text.
        let mut ids: Vec<i64> = vec![1, 2, 3];
        ids.extend(std::iter::repeat_n(placeholder, frames * per_frame));
        ids.extend([4, 5]);
        let len = ids.len();
        let input_ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, len]), &device);
        let position_ids = default_position_ids(1, len, &device);
        let pixels = Tensor::<4>::random(
            [frames, 3, side, side],
            Distribution::Normal(0.0, 1.0),
            &device,
        );

        let expected = model
            .forward(VlmInput {
                input_ids: input_ids.clone(),
                position_ids: position_ids.clone(),
                visual: VisualInput::Pixels(pixels.clone()),
            })
            .unwrap();

        let (x, grid) = model.vision_stem(pixels);
        let x = split_run(model.vision_layers(), &(), x);
        let visual = model.project(x, grid);
        assert_eq!(visual.dims(), [frames, per_frame, config.text.hidden_size]);
        let text = model.embed_tokens(input_ids.clone());
        let x = model.splice(text, &input_ids, Some(visual)).unwrap();
        let rope = model.text_context(position_ids);
        let x = split_run(model.text_layers(), &rope, x);
        let actual = model.logits(x);

        let (a, e) = (
            actual.try_into_vec_as::<f32>().unwrap(),
            expected.try_into_vec_as::<f32>().unwrap(),
        );
        assert_eq!(a.len(), e.len());
        let worst = a
            .iter()
            .zip(&e)
            .map(|(a, e)| (a - e).abs())
            .fold(0f32, f32::max);
        // The same f32 operations in the same order: equal up to nothing at all.
        assert!(worst <= 1e-6, "max abs difference {worst}");
        assert_eq!(
            model.vision_layers().len(),
            config.vision.num_layers - 1,
            "layer -2 feature"
        );
    }
}
