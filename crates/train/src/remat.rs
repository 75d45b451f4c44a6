//! Activation checkpointing ("rematerialisation") for a training step.
//!
//! Autodiff keeps every intermediate of the forward pass until the backward, which at
//! long sequences is far more than the weights: a 1.5B-shaped model at 32k tokens
//! would keep tens of GiB per step. [`loss_and_grads`] runs the step segment by
//! segment instead: the forward pass runs without autodiff (the model's `valid()`
//! copy) and keeps only what [`Recompute`] names per layer; the backward walks the
//! layers last to first, replays each one under autodiff from what was kept, and
//! pulls the layer's parameter gradients and its input gradient out of that replay.
//!
//! - [`Recompute::Layers`]: the usual per-layer recomputation (Megatron's "full"
//!   recompute, Hugging Face's gradient checkpointing): layer inputs kept, every
//!   layer's forward, attention included, runs twice.
//! - [`Recompute::AttentionAware`]: LightSeq's rematerialisation-aware checkpointing
//!   (Li et al. 2023, section 3.3): the attention output and its log-sum-exp are kept
//!   as well, so the replay runs the layer's parts around the attention only and the
//!   attention's gradients come straight from the flash backward kernels
//!   ([`attention_input_grads`]): the attention forward, the most expensive part of
//!   a long-sequence layer, never runs twice. This applies to the LLM's layers; the
//!   vision encoder's (attention within one frame) are recomputed whole
//!   ([`Recompute::for_vision`]).
//!
//! Every mode gives the gradients of plain autodiff (tests assert it) and computes
//! the loss on the supervised rows only ([`Qwen2::next_token_loss_sum`]), so a long
//! video with a short answer never materialises `[seq, vocab]` logits.
//!
//! [`loss_and_grads`] works on one device with the reference or flash attention;
//! sequence-parallel ranks (`AttentionImpl::Sharded`) recompute through the MM-SP
//! step ([`crate::mmsp`]), which uses the same per-stack forward and backward: there
//! the kept attention output and LSE feed the scheme's distributed backward, so the
//! ring's forward (compute and communication) never runs twice either.

use std::fmt;
use std::str::FromStr;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Gradients, Int, Tensor};
use serde::{Deserialize, Serialize};

use longview_models::attention::{
    AttentionImpl, SplitAtAttention, attend_with_lse, attention_input_grads,
};
use longview_models::vila::text::Rope;
use longview_models::vila::vision::patch_grid;
use longview_models::vila::{Qwen2, VisionFeature, VisualInput};
use longview_models::{ModelError, Vlm, VlmInput};

/// What the forward pass keeps for the backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Recompute {
    /// Plain autodiff: every intermediate kept, nothing recomputed.
    #[default]
    None,
    /// Layer inputs kept; each layer's forward runs again in the backward.
    Layers,
    /// LLM layers: inputs, attention outputs and their LSE kept; the backward replays
    /// each layer around its attention, whose forward never runs twice (LightSeq).
    /// Vision layers (short per-frame attention) as in `Layers` ([`Recompute::for_vision`]).
    AttentionAware,
}

impl Recompute {
    pub const NAMES: &'static str = "none, layers, attention-aware";

    /// What the vision encoder's layers keep under this mode. LightSeq's
    /// attention-aware scheme pays where attention is long (the LLM's, over the whole
    /// sequence); the encoder attends within one frame (729 tokens for SigLIP at 384
    /// px), so keeping its attention output would cost as much memory as the layer
    /// input for a forward that is cheap to run again: under `AttentionAware` the
    /// vision layers are recomputed whole (`Layers`).
    pub fn for_vision(self) -> Recompute {
        match self {
            Recompute::AttentionAware => Recompute::Layers,
            other => other,
        }
    }
}

impl fmt::Display for Recompute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Recompute::None => "none",
            Recompute::Layers => "layers",
            Recompute::AttentionAware => "attention-aware",
        })
    }
}

impl FromStr for Recompute {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Recompute::None),
            "layers" => Ok(Recompute::Layers),
            "attention-aware" => Ok(Recompute::AttentionAware),
            other => Err(format!(
                "recompute `{other}`: expected one of {}",
                Recompute::NAMES
            )),
        }
    }
}

/// The loss (summed over supervised next tokens, divided by `normaliser`) of one
/// micro-batch and the gradients of the model's trainable parameters.
///
/// `labels` are aligned with the input ids (shifted inside); placeholder positions
/// are never supervised. `model` lives on an autodiff device.
pub fn loss_and_grads(
    model: &Vlm,
    input: VlmInput,
    labels: Tensor<2, Int>,
    normaliser: f32,
    mode: Recompute,
) -> Result<(f32, GradientsParams), ModelError> {
    for layer in model.llm.model.layers.iter() {
        if layer.attention_impl() == AttentionImpl::Sharded {
            return Err(ModelError::Input(
                "activation recomputation runs on one device; sequence-parallel ranks \
                 (AttentionImpl::Sharded) go through the MM-SP step"
                    .into(),
            ));
        }
    }
    let labels = model.unsupervise_placeholders(&input.input_ids, labels);
    let normaliser = normaliser.max(f32::MIN_POSITIVE);
    match mode {
        Recompute::None => plain(model, input, &labels, normaliser),
        _ => segmented(model, input, &labels, normaliser, mode),
    }
}

/// Autodiff over the whole step.
fn plain(
    model: &Vlm,
    input: VlmInput,
    labels: &Tensor<2, Int>,
    normaliser: f32,
) -> Result<(f32, GradientsParams), ModelError> {
    let llm = &model.llm;
    let mut x = model.embed(input.input_ids, input.visual)?;
    let rope = Rope::new(input.position_ids, llm.head_dim, llm.rope_theta);
    for layer in &llm.model.layers {
        x = layer.forward(x, &rope);
    }
    let (sum, _) = llm.next_token_loss_sum(x, labels)?;
    let loss = sum.div_scalar(normaliser);
    let value = loss.clone().into_scalar::<f32>();
    Ok((value, GradientsParams::from_grads(loss.backward(), model)))
}

/// What the forward pass kept of one layer: its input and, attention-aware, the
/// attention output and LSE. Tensors without autodiff.
pub(crate) struct Kept {
    x: Tensor<3>,
    attention: Option<(Tensor<4>, Option<Tensor<3>>)>,
}

/// Runs a stack without autodiff, keeping what `mode` asks for.
pub(crate) fn forward_stack<L: SplitAtAttention>(
    layers: &[L],
    context: &L::Context,
    mut x: Tensor<3>,
    mode: Recompute,
) -> (Tensor<3>, Vec<Kept>) {
    let mut kept = Vec::with_capacity(layers.len());
    for layer in layers {
        let next = if mode == Recompute::AttentionAware {
            let input = layer.attention_input(x.clone(), context);
            let (o, lse) = attend_with_lse(layer.attention_impl(), input);
            let next = layer.after_attention(x.clone(), o.clone());
            kept.push(Kept {
                x,
                attention: Some((o, lse)),
            });
            next
        } else {
            let next = layer.forward_split(x.clone(), context);
            kept.push(Kept { x, attention: None });
            next
        };
        x = next;
    }
    (x, kept)
}

/// `sum(out * grad)`: its gradient with respect to `out` is `grad` exactly.
pub(crate) fn surrogate<const D: usize>(out: Tensor<D>, grad: Tensor<D>) -> Tensor<1> {
    let dtype = out.dtype();
    (out * grad.cast(dtype)).sum()
}

/// The gradient of a leaf, zeros where nothing reached it.
pub(crate) fn grad_or_zeros<const D: usize>(leaf: &Tensor<D>, grads: &Gradients) -> Tensor<D> {
    leaf.grad(grads)
        .unwrap_or_else(|| Tensor::zeros(leaf.dims(), (&leaf.device(), leaf.dtype())))
}

/// Replays a stack last layer first from what [`forward_stack`] kept; returns the
/// gradient of the stack's input.
pub(crate) fn backward_stack<L: SplitAtAttention + Module>(
    layers: &[L],
    context: &L::Context,
    kept: Vec<Kept>,
    mut grad: Tensor<3>,
    into: &mut GradientsParams,
) -> Tensor<3> {
    for (layer, kept) in layers.iter().zip(kept).rev() {
        let x = kept.x.clone().autodiff().require_grad();
        grad = match kept.attention {
            None => {
                let out = layer.forward_split(x.clone(), context);
                let mut grads = surrogate(out, grad).backward();
                take_grads(layer, &mut grads, into);
                grad_or_zeros(&x, &grads)
            }
            Some((o, lse)) => {
                // After the attention: o_proj, residuals, MLP; gives dO.
                let o_leaf = o.clone().autodiff().require_grad();
                let out = layer.after_attention(x.clone(), o_leaf.clone());
                let mut grads = surrogate(out, grad).backward();
                take_grads(layer, &mut grads, into);
                let grad_residual = grad_or_zeros(&x, &grads);
                let d_o = grad_or_zeros(&o_leaf, &grads);
                // The attention's backward from the kept O and LSE, then the parts before it.
                let x = kept.x.autodiff().require_grad();
                let input = layer.attention_input(x.clone(), context);
                let (dq, dk, dv) = attention_input_grads(
                    layer.attention_impl(),
                    input.clone(),
                    o.autodiff(),
                    lse.map(|l| l.autodiff()),
                    d_o,
                );
                let total =
                    surrogate(input.q, dq) + surrogate(input.k, dk) + surrogate(input.v, dv);
                let mut grads = total.backward();
                take_grads(layer, &mut grads, into);
                grad_residual + grad_or_zeros(&x, &grads)
            }
        };
    }
    grad
}

/// Moves the gradients of `module`'s parameters from `grads` into `into`, adding to
/// what is there (a parameter used by two segments: a tied LM head, a layer replayed
/// in two parts).
pub(crate) fn take_grads<M: Module>(module: &M, grads: &mut Gradients, into: &mut GradientsParams) {
    struct Take<'a> {
        grads: &'a mut Gradients,
        into: &'a mut GradientsParams,
    }
    impl ModuleVisitor for Take<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if !param.is_require_grad() {
                return;
            }
            let Some(grad) = param.val().grad_remove(self.grads) else {
                return;
            };
            let grad = match self.into.remove::<D>(param.id) {
                Some(previous) => previous + grad,
                None => grad,
            };
            self.into.register::<D>(param.id, grad);
        }
    }
    module.visit(&mut Take { grads, into });
}

/// The head's backward from kept hidden states (untracked): `loss_sum` (final norm, LM
/// head and cross entropy on the supervised rows) divided by `normaliser`, the norm's
/// and the head's (or tied embeddings') gradients moved into `into`. Returns the loss
/// and the gradient of the hidden states.
pub(crate) fn head_backward(
    llm: &Qwen2,
    hidden: Tensor<3>,
    loss_sum: impl FnOnce(Tensor<3>) -> Result<(Tensor<1>, usize), ModelError>,
    normaliser: f32,
    into: &mut GradientsParams,
) -> Result<(f32, Tensor<3>), ModelError> {
    let hidden = hidden.autodiff().require_grad();
    let (sum, _) = loss_sum(hidden.clone())?;
    let loss = sum.div_scalar(normaliser);
    let value = loss.clone().into_scalar::<f32>();
    let mut grads = loss.backward();
    take_grads(&llm.model.norm, &mut grads, into);
    match &llm.lm_head {
        Some(head) => take_grads(head, &mut grads, into),
        None => take_grads(&llm.model.embed_tokens, &mut grads, into),
    }
    Ok((value, grad_or_zeros(&hidden, &grads)))
}

/// Whether any parameter of `module` trains.
pub(crate) fn trains<M: Module>(module: &M) -> bool {
    struct Any(bool);
    impl ModuleVisitor for Any {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0 |= param.is_require_grad();
        }
    }
    let mut any = Any(false);
    module.visit(&mut any);
    any.0
}

/// What gets spliced into the text embeddings: the given visual embeddings, or the
/// projector's tokens for the vision tower's output on its patch grid.
fn visual_input(
    vlm: &Vlm,
    given: Option<Tensor<3>>,
    tower_out: Option<(Tensor<3>, (usize, usize))>,
) -> VisualInput {
    if let Some(tokens) = given {
        return VisualInput::Embeddings(tokens);
    }
    match tower_out {
        Some((x, grid)) => VisualInput::Embeddings(project(vlm, x, grid)),
        None => VisualInput::None,
    }
}

/// The projector's visual tokens for the output of the vision encoder's layers (after
/// the post-layernorm where the feature is the last layer's).
///
/// # Shapes
/// - x: `[frames, patches, vision_hidden]`; output: `[frames, tokens_per_frame, text_hidden]`
pub(crate) fn project(vlm: &Vlm, x: Tensor<3>, grid: (usize, usize)) -> Tensor<3> {
    let features = match vlm.vision_feature {
        VisionFeature::Last => vlm.vision_tower.post_layernorm.forward(x),
        VisionFeature::Layer(_) => x,
    };
    vlm.mm_projector.forward(features, grid)
}

/// The step segment by segment: vision layers, projector + embeddings, LLM layers,
/// head; forward without autodiff, backward replaying one segment at a time.
fn segmented(
    model: &Vlm,
    input: VlmInput,
    labels: &Tensor<2, Int>,
    normaliser: f32,
    mode: Recompute,
) -> Result<(f32, GradientsParams), ModelError> {
    let plain = model.valid();
    let llm = &model.llm;
    let ids = input.input_ids;
    let plain_ids = ids.clone().inner();

    // Given visual embeddings are constants of the step.
    let given = match &input.visual {
        VisualInput::Embeddings(tokens) => Some(tokens.clone().detach()),
        _ => None,
    };

    // Forward, vision: patch embeddings, then the encoder layers the feature needs.
    let tower_trains = trains(&model.vision_tower);
    let vision = match input.visual {
        VisualInput::Pixels(pixels) => {
            let pixels = pixels.inner();
            let [_, _, height, width] = pixels.dims();
            let tower = &plain.vision_tower;
            let grid = patch_grid(height, width, tower.embeddings.patch_size);
            let layers = tower.layers_to_run(model.vision_feature);
            let x = tower.embeddings.forward(pixels.clone());
            let (x, kept) =
                forward_stack(&tower.encoder.layers[..layers], &(), x, mode.for_vision());
            Some((pixels, grid, layers, x, kept))
        }
        _ => None,
    };
    // Forward, LLM.
    let tower_out = vision.as_ref().map(|(_, grid, _, x, _)| (x.clone(), *grid));
    let plain_given = given.clone().map(Tensor::inner);
    let embeds = plain.embed(plain_ids, visual_input(&plain, plain_given, tower_out))?;
    let position_ids = input.position_ids;
    let plain_rope = Rope::new(position_ids.clone().inner(), llm.head_dim, llm.rope_theta);
    let (hidden, kept) = forward_stack(&plain.llm.model.layers, &plain_rope, embeds, mode);
    drop(plain_rope);

    // Head: final norm, LM head and loss on the supervised rows.
    let mut into = GradientsParams::new();
    let (value, grad) = head_backward(
        llm,
        hidden,
        |h| llm.next_token_loss_sum(h, labels),
        normaliser,
        &mut into,
    )?;

    // Backward, LLM layers.
    let rope = Rope::new(position_ids, llm.head_dim, llm.rope_theta);
    let grad = backward_stack(&llm.model.layers, &rope, kept, grad, &mut into);
    drop(rope);

    // Embeddings and projector (and the vision tower's post-layernorm).
    let vision_leaf = match &vision {
        Some((_, _, _, x, _)) if tower_trains => Some(x.clone().autodiff().require_grad()),
        Some((_, _, _, x, _)) => Some(x.clone().autodiff()),
        None => None,
    };
    let tower_out = vision_leaf
        .clone()
        .zip(vision.as_ref().map(|(_, grid, ..)| *grid));
    let embeds = model.embed(ids, visual_input(model, given, tower_out))?;
    let mut grads = surrogate(embeds, grad).backward();
    take_grads(&llm.model.embed_tokens, &mut grads, &mut into);
    take_grads(&model.mm_projector, &mut grads, &mut into);
    take_grads(&model.vision_tower.post_layernorm, &mut grads, &mut into);

    // Backward, vision layers and patch embeddings.
    if let (Some((pixels, _, layers, _, kept)), Some(leaf)) = (vision, vision_leaf)
        && tower_trains
    {
        let grad = grad_or_zeros(&leaf, &grads);
        drop(grads);
        let tower = &model.vision_tower;
        let grad = backward_stack(&tower.encoder.layers[..layers], &(), kept, grad, &mut into);
        let x = tower.embeddings.forward(pixels.autodiff());
        let mut grads = surrogate(x, grad).backward();
        take_grads(&tower.embeddings, &mut grads, &mut into);
    }
    Ok((value, into))
}
