//! Qwen2 decoder-only LLM, as `Qwen2ForCausalLM` in Hugging Face transformers:
//! RMSNorm, rotate-half RoPE over per-token position ids, grouped-query attention with
//! biased q/k/v projections, SwiGLU MLP, tied or untied LM head.
//!
//! Field names mirror the Hugging Face parameter names so checkpoints map one to one.

use crate::linear::linear;
use burn::module::{Module, Param};
use burn::nn::{
    Embedding, EmbeddingConfig, Initializer, Linear, LinearConfig, RmsNorm, RmsNormConfig,
};
use burn::tensor::activation::silu;
use burn::tensor::{Device, Int, Tensor};

use super::config::TextConfig;
pub use super::kv_cache::{KvCache, LayerCache};
use super::lora::{AttentionLora, Lora};
pub use super::rope::Rope;
use crate::attention::{AttentionImpl, AttentionInput, AttentionMask, SplitAtAttention, attend};

#[derive(Module, Debug)]
pub struct Qwen2Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    /// LoRA adapters (stage 4, context extension); `None` otherwise.
    pub lora: Option<AttentionLora>,
    #[module(skip)]
    pub num_heads: usize,
    #[module(skip)]
    pub num_kv_heads: usize,
    #[module(skip)]
    pub attention: AttentionImpl,
}

impl Qwen2Attention {
    /// # Shapes
    /// - x, output: `[batch, seq, hidden]`
    pub fn forward(&self, x: Tensor<3>, rope: &Rope) -> Tensor<3> {
        self.forward_cached(x, rope, None)
    }

    /// With `cache`, the new keys and values are appended to the cached ones and the
    /// queries (the new tokens, the last of the sequence) attend to all of them.
    ///
    /// # Shapes
    /// - x, output: `[batch, seq, hidden]` (the new tokens only)
    /// - cache: `[batch, kv_heads, cached, head_dim]` keys and values
    pub fn forward_cached(
        &self,
        x: Tensor<3>,
        rope: &Rope,
        cache: Option<&mut LayerCache>,
    ) -> Tensor<3> {
        let mut input = self.qkv(x, rope);
        if let Some(cache) = cache {
            (input.k, input.v) = cache.append(input.k, input.v);
        }
        self.project_out(attend(self.attention, input))
    }

    /// Projections (plus LoRA) and RoPE: the causal attention's inputs.
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]`
    pub fn qkv(&self, x: Tensor<3>, rope: &Rope) -> AttentionInput {
        let [b, s, hidden] = x.dims();
        let d = hidden / self.num_heads;
        let split = |t: Tensor<3>, heads: usize| t.reshape([b, s, heads, d]).swap_dims(1, 2);
        let (mut q, mut k, mut v) = (
            linear(&self.q_proj, x.clone()),
            linear(&self.k_proj, x.clone()),
            linear(&self.v_proj, x.clone()),
        );
        if let Some(lora) = &self.lora {
            q = q + lora.q.forward(x.clone());
            k = k + lora.k.forward(x.clone());
            v = v + lora.v.forward(x);
        }
        AttentionInput {
            q: rope.apply(split(q, self.num_heads)),
            k: rope.apply(split(k, self.num_kv_heads)),
            v: split(v, self.num_kv_heads),
            mask: AttentionMask::Causal,
            scale: (d as f64).powf(-0.5),
        }
    }

    /// Heads merged, then the output projection (plus LoRA).
    ///
    /// # Shapes
    /// - out: `[batch, heads, seq, head_dim]`; output: `[batch, seq, hidden]`
    pub fn project_out(&self, out: Tensor<4>) -> Tensor<3> {
        let [b, h, s, d] = out.dims();
        let out = out.swap_dims(1, 2).reshape([b, s, h * d]);
        match &self.lora {
            Some(lora) => linear(&self.o_proj, out.clone()) + lora.o.forward(out),
            None => linear(&self.o_proj, out),
        }
    }
}

/// SwiGLU: `down(silu(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct Qwen2Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Qwen2Mlp {
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let gate = linear(&self.gate_proj, x.clone());
        let up = linear(&self.up_proj, x);
        linear(&self.down_proj, swiglu(gate, up))
    }
}

#[derive(Module, Debug)]
pub struct Qwen2DecoderLayer {
    pub self_attn: Qwen2Attention,
    pub mlp: Qwen2Mlp,
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
}

impl Qwen2DecoderLayer {
    pub fn forward(&self, x: Tensor<3>, rope: &Rope) -> Tensor<3> {
        self.forward_cached(x, rope, None)
    }

    pub fn forward_cached(
        &self,
        x: Tensor<3>,
        rope: &Rope,
        cache: Option<&mut LayerCache>,
    ) -> Tensor<3> {
        let x = x.clone()
            + self
                .self_attn
                .forward_cached(rms_norm(&self.input_layernorm, x), rope, cache);
        self.mlp_block(x)
    }

    /// `x + mlp(post_attention_layernorm(x))`.
    fn mlp_block(&self, x: Tensor<3>) -> Tensor<3> {
        x.clone()
            + self
                .mlp
                .forward(rms_norm(&self.post_attention_layernorm, x))
    }
}

impl SplitAtAttention for Qwen2DecoderLayer {
    type Context = Rope;

    fn attention_input(&self, x: Tensor<3>, rope: &Rope) -> AttentionInput {
        self.self_attn.qkv(rms_norm(&self.input_layernorm, x), rope)
    }

    fn after_attention(&self, x: Tensor<3>, attention: Tensor<4>) -> Tensor<3> {
        self.mlp_block(x + self.self_attn.project_out(attention))
    }

    fn attention_impl(&self) -> AttentionImpl {
        self.self_attn.attention
    }
}

/// RMSNorm of `x` in one fused kernel (with its backward) where that can run (a
/// CubeCL device), else Burn's `RmsNorm` ops (the same formula).
pub(crate) fn rms_norm(norm: &RmsNorm, x: Tensor<3>) -> Tensor<3> {
    #[cfg(any(feature = "flash-cuda", feature = "flash-wgpu"))]
    if let Some(y) = longview_kernels::fused::rms_norm(x.clone(), norm.gamma.val(), norm.epsilon) {
        return y;
    }
    norm.forward(x)
}

/// `silu(gate) * up` in one fused kernel (with its backward) where that can run (as
/// [`rms_norm`]), else Burn's ops.
fn swiglu(gate: Tensor<3>, up: Tensor<3>) -> Tensor<3> {
    #[cfg(any(feature = "flash-cuda", feature = "flash-wgpu"))]
    if let Some(y) = longview_kernels::fused::swiglu(gate.clone(), up.clone()) {
        return y;
    }
    silu(gate) * up
}

/// The decoder stack (`Qwen2Model`).
#[derive(Module, Debug)]
pub struct Qwen2Model {
    pub embed_tokens: Embedding,
    pub layers: Vec<Qwen2DecoderLayer>,
    pub norm: RmsNorm,
}

/// `Qwen2ForCausalLM`: the stack plus the LM head (`None` when tied to the embeddings).
#[derive(Module, Debug)]
pub struct Qwen2 {
    pub model: Qwen2Model,
    pub lm_head: Option<Linear>,
    #[module(skip)]
    pub rope_theta: f64,
    #[module(skip)]
    pub head_dim: usize,
}

/// What [`Qwen2::forward_embeds`] returns.
#[derive(Debug, Clone)]
pub struct TextOutput {
    /// `[batch, seq, vocab]`
    pub logits: Tensor<3>,
    /// With `keep_hidden`: the input of every layer, then the final normed states
    /// (the layout of transformers' `output_hidden_states`), each `[batch, seq, hidden]`.
    pub hidden_states: Vec<Tensor<3>>,
}

impl TextConfig {
    /// # Panics
    /// On an impossible head split; validate user configs with [`TextConfig::validate`] first.
    pub fn init(&self, device: &Device) -> Qwen2 {
        if let Err(e) = self.validate() {
            panic!("invalid text config: {e}");
        }
        let h = self.hidden_size;
        let d = self.head_dim();
        let kv = self.num_kv_heads * d;
        let normal = self
            .initializer_range
            .map(|std| Initializer::Normal { mean: 0.0, std });
        let linear = |i, o, bias| {
            let config = LinearConfig::new(i, o).with_bias(bias);
            match normal.clone() {
                // Qwen2's `_init_weights`: normal weights, zero biases.
                Some(init) => {
                    let mut layer = config.with_initializer(init).init(device);
                    layer.bias = layer
                        .bias
                        .map(|_| Param::from_tensor(Tensor::zeros([o], device)));
                    layer
                }
                None => config.init(device),
            }
        };
        let norm = || {
            RmsNormConfig::new(h)
                .with_epsilon(self.rms_norm_eps)
                .init(device)
        };
        let layers = (0..self.num_layers)
            .map(|_| Qwen2DecoderLayer {
                self_attn: Qwen2Attention {
                    q_proj: linear(h, self.num_heads * d, true),
                    k_proj: linear(h, kv, true),
                    v_proj: linear(h, kv, true),
                    o_proj: linear(self.num_heads * d, h, false),
                    lora: None,
                    num_heads: self.num_heads,
                    num_kv_heads: self.num_kv_heads,
                    attention: self.attention,
                },
                mlp: Qwen2Mlp {
                    gate_proj: linear(h, self.intermediate_size, false),
                    up_proj: linear(h, self.intermediate_size, false),
                    down_proj: linear(self.intermediate_size, h, false),
                },
                input_layernorm: norm(),
                post_attention_layernorm: norm(),
            })
            .collect();
        Qwen2 {
            model: Qwen2Model {
                embed_tokens: match normal.clone() {
                    Some(init) => EmbeddingConfig::new(self.vocab_size, h)
                        .with_initializer(init)
                        .init(device),
                    None => EmbeddingConfig::new(self.vocab_size, h).init(device),
                },
                layers,
                norm: norm(),
            },
            lm_head: (!self.tie_word_embeddings).then(|| linear(h, self.vocab_size, false)),
            rope_theta: self.rope_theta,
            head_dim: d,
        }
    }
}

impl Qwen2 {
    /// The same model calling `attention` in every layer (e.g.
    /// [`AttentionImpl::Sharded`] on the ranks of a sequence-parallel group).
    pub fn with_attention(mut self, attention: AttentionImpl) -> Self {
        for layer in &mut self.model.layers {
            layer.self_attn.attention = attention;
        }
        self
    }

    /// # Shapes
    /// - input_ids: `[batch, seq]`
    /// - output: `[batch, seq, hidden]`
    pub fn embed(&self, input_ids: Tensor<2, Int>) -> Tensor<3> {
        self.model.embed_tokens.forward(input_ids)
    }

    /// The RoPE tables of `position_ids` (`[batch, seq]`) that every layer shares, in
    /// the model's dtype.
    pub fn rope(&self, position_ids: Tensor<2, Int>) -> Rope {
        let dtype = self.model.embed_tokens.weight.val().dtype();
        Rope::new(position_ids, self.head_dim, self.rope_theta).cast(dtype)
    }

    /// Rows of the embedding table (token ids the model knows).
    pub fn vocab_size(&self) -> usize {
        self.model.embed_tokens.weight.dims()[0]
    }

    /// The decoder layers, first to last.
    pub fn layers(&self) -> &[Qwen2DecoderLayer] {
        &self.model.layers
    }

    /// The attention the layers call (the first layer's; [`Qwen2::with_attention`]
    /// sets every layer's).
    pub fn attention(&self) -> AttentionImpl {
        self.model
            .layers
            .first()
            .map_or(AttentionImpl::Reference, |l| l.self_attn.attention)
    }

    /// Final norm and LM head.
    ///
    /// # Shapes
    /// - hidden: `[batch, seq, hidden]` (the last layer's output); output:
    ///   `[batch, seq, vocab]`
    pub fn head(&self, hidden: Tensor<3>) -> Tensor<3> {
        self.lm_head(rms_norm(&self.model.norm, hidden))
    }

    /// Runs the decoder on input embeddings.
    ///
    /// # Shapes
    /// - embeds: `[batch, seq, hidden]`
    /// - position_ids: `[batch, seq]` (any per-token positions: packed or shifted sequences)
    pub fn forward_embeds(
        &self,
        embeds: Tensor<3>,
        position_ids: Tensor<2, Int>,
        keep_hidden: bool,
    ) -> TextOutput {
        let rope = self.rope(position_ids);
        let mut hidden_states = Vec::new();
        let mut x = embeds;
        for layer in &self.model.layers {
            if keep_hidden {
                hidden_states.push(x.clone());
            }
            x = layer.forward(x, &rope);
        }
        let x = rms_norm(&self.model.norm, x);
        if keep_hidden {
            hidden_states.push(x.clone());
        }
        TextOutput {
            logits: self.lm_head(x),
            hidden_states,
        }
    }

    /// Runs the decoder on the embeddings of new tokens that continue the sequence in
    /// `cache` (empty for the prompt), appending their keys and values to it. The new
    /// tokens attend causally to the cached ones and to each other; the logits equal
    /// the matching rows of a [`Qwen2::forward_embeds`] over the whole sequence.
    ///
    /// # Shapes
    /// - embeds: `[batch, new, hidden]`
    /// - position_ids: `[batch, new]`
    /// - output: `[batch, new, vocab]`
    pub fn forward_embeds_cached(
        &self,
        embeds: Tensor<3>,
        position_ids: Tensor<2, Int>,
        cache: &mut KvCache,
    ) -> Tensor<3> {
        self.head(self.layers_cached(embeds, position_ids, cache))
    }

    /// The decoder layers over new tokens continuing `cache` (see
    /// [`Qwen2::forward_embeds_cached`]), without the final norm and head: what chunked
    /// prefill runs, taking the head of the rows it needs only.
    ///
    /// # Shapes
    /// - embeds: `[batch, new, hidden]`; position_ids: `[batch, new]`
    /// - output: `[batch, new, hidden]` (the last layer's output)
    pub fn layers_cached(
        &self,
        embeds: Tensor<3>,
        position_ids: Tensor<2, Int>,
        cache: &mut KvCache,
    ) -> Tensor<3> {
        let new = embeds.dims()[1];
        let rope = self.rope(position_ids);
        let layers = self.model.layers.len();
        let mut x = embeds;
        for (i, layer) in self.model.layers.iter().enumerate() {
            x = layer.forward_cached(x, &rope, Some(cache.layer_cache(i, layers)));
        }
        cache.len += new;
        x
    }

    /// Token ids to logits.
    ///
    /// # Shapes
    /// - input_ids, position_ids: `[batch, seq]`
    /// - output: `[batch, seq, vocab]`
    pub fn forward(&self, input_ids: Tensor<2, Int>, position_ids: Tensor<2, Int>) -> Tensor<3> {
        self.forward_embeds(self.embed(input_ids), position_ids, false)
            .logits
    }

    /// # Shapes
    /// - hidden: `[batch, seq, hidden]`
    /// - output: `[batch, seq, vocab]`
    pub fn lm_head(&self, hidden: Tensor<3>) -> Tensor<3> {
        match &self.lm_head {
            Some(head) => linear(head, hidden),
            None => {
                // [vocab, hidden]
                crate::linear::tied_head(hidden, self.model.embed_tokens.weight.val())
            }
        }
    }
}

/// Position ids `0..seq` for every row.
///
/// # Shapes
/// - output: `[batch, seq]`
pub fn default_position_ids(batch: usize, seq: usize, device: &Device) -> Tensor<2, Int> {
    Tensor::<1, Int>::arange(0..seq as i64, device)
        .unsqueeze_dim::<2>(0)
        .repeat_dim(0, batch)
}

impl Qwen2 {
    /// Adds fresh adapters (rank `rank`, scale `alpha / rank`) to every attention
    /// block's q, k, v and o projections; the model computes the same function until
    /// the adapters train.
    /// `seed` decides the adapters' `A` matrices (host-side draws).
    pub fn with_lora(mut self, rank: usize, alpha: f64, seed: u64, device: &Device) -> Self {
        for (i, layer) in self.model.layers.iter_mut().enumerate() {
            let attn = &mut layer.self_attn;
            let [h, q_out] = attn.q_proj.weight.dims();
            let kv_out = attn.k_proj.weight.dims()[1];
            let [o_in, o_out] = attn.o_proj.weight.dims();
            let seed = |j: u64| seed ^ ((i as u64) << 8 | j).wrapping_mul(0xD1B5_4A32_D192_ED03);
            attn.lora = Some(AttentionLora {
                q: Lora::new(h, q_out, rank, alpha, seed(0), device),
                k: Lora::new(h, kv_out, rank, alpha, seed(1), device),
                v: Lora::new(h, kv_out, rank, alpha, seed(2), device),
                o: Lora::new(o_in, o_out, rank, alpha, seed(3), device),
            });
        }
        self
    }

    /// Folds every adapter into its projection's weight and drops the adapters: a
    /// plain Qwen2 computing the same function (what checkpoints store).
    pub fn merge_lora(mut self) -> Self {
        for layer in &mut self.model.layers {
            let attn = &mut layer.self_attn;
            if let Some(lora) = attn.lora.take() {
                attn.q_proj = super::lora::shift(attn.q_proj.clone(), lora.q.delta(), 1.0);
                attn.k_proj = super::lora::shift(attn.k_proj.clone(), lora.k.delta(), 1.0);
                attn.v_proj = super::lora::shift(attn.v_proj.clone(), lora.v.delta(), 1.0);
                attn.o_proj = super::lora::shift(attn.o_proj.clone(), lora.o.delta(), 1.0);
            }
        }
        self
    }

    /// The inverse of [`Qwen2::merge_lora`]: attaches `adapters` (one per layer) to a
    /// merged model and subtracts their deltas from the weights, giving back the base
    /// weights (to f32 rounding) for a resumed LoRA run.
    pub fn unmerge_lora(mut self, adapters: Vec<AttentionLora>) -> Self {
        assert_eq!(
            adapters.len(),
            self.model.layers.len(),
            "one adapter set per layer"
        );
        for (layer, lora) in self.model.layers.iter_mut().zip(adapters) {
            let attn = &mut layer.self_attn;
            attn.q_proj = super::lora::shift(attn.q_proj.clone(), lora.q.delta(), -1.0);
            attn.k_proj = super::lora::shift(attn.k_proj.clone(), lora.k.delta(), -1.0);
            attn.v_proj = super::lora::shift(attn.v_proj.clone(), lora.v.delta(), -1.0);
            attn.o_proj = super::lora::shift(attn.o_proj.clone(), lora.o.delta(), -1.0);
            attn.lora = Some(lora);
        }
        self
    }

    /// Whether the attention blocks carry adapters.
    pub fn has_lora(&self) -> bool {
        self.model.layers.iter().any(|l| l.self_attn.lora.is_some())
    }

    /// The model with only the LoRA adapters, the embeddings and the norms trainable
    /// (LongVILA's stage 4); everything else frozen.
    pub fn lora_trainable(self) -> Self {
        let mut llm = self.no_grad();
        let m = &mut llm.model;
        m.embed_tokens = m.embed_tokens.clone().set_require_grad(true);
        m.norm = m.norm.clone().set_require_grad(true);
        for layer in &mut m.layers {
            layer.input_layernorm = layer.input_layernorm.clone().set_require_grad(true);
            layer.post_attention_layernorm = layer
                .post_attention_layernorm
                .clone()
                .set_require_grad(true);
            layer.self_attn.lora = layer
                .self_attn
                .lora
                .take()
                .map(|lora| lora.set_require_grad(true));
        }
        llm
    }
}
