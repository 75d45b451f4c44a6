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
//! [`run_step`] is the one executor of a training step over the model's stages
//! (`longview_models::vila` stages: vision stem, vision layers, projection, embed +
//! splice, text layers, head), for every mode, [`Recompute::None`] included. What
//! differs between one device and a rank of an MM-SP group is supplied as
//! [`StepHooks`]: where the spliced visual tokens come from (an all-gather) and where
//! their gradient goes (a reduce-scatter), how the text is spliced and which rows the
//! loss reads. On sequence-parallel ranks (`AttentionImpl::Sharded`) the kept
//! attention output and LSE feed the scheme's distributed backward, so the ring's
//! forward (compute and communication) never runs twice either.
//! [`loss_and_grads`] is the one-device entry point.

use std::fmt;
use std::str::FromStr;

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{Int, Tensor};
use serde::{Deserialize, Serialize};

use longview_models::attention::AttentionImpl;
use longview_models::vila::{SupervisedRows, VisualInput};
use longview_models::{Vlm, VlmInput};

use crate::error::TrainError;

mod head;
pub(crate) mod stack;

use head::head_backward;

use stack::{backward_stack, forward_stack, grad_or_zeros, surrogate, take_grads, trains};

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

/// A training step's inputs as this rank sees them.
pub struct StepInput {
    /// This rank's frames, `[frames, 3, height, width]`, or `None` (text only, or
    /// visual embeddings given).
    pub pixels: Option<Tensor<4>>,
    /// Visual tokens given as constants of the step (`[frames, per_frame, hidden]`),
    /// e.g. cached embeddings; nothing is back-propagated into them.
    pub given_visual: Option<Tensor<3>>,
    /// `[batch, seq]` ids and RoPE positions of this rank's tokens.
    pub ids: Tensor<2, Int>,
    pub position_ids: Tensor<2, Int>,
}

/// What a layout supplies to [`run_step`]; tensors passed in and out are untracked.
pub trait StepHooks {
    /// The visual tokens the text stage splices, from this rank's own (`[frames,
    /// per_frame, hidden]`): the same tensor on one device, every rank's tokens of
    /// the group in an MM-SP layout.
    fn gather_visual(&self, local: Tensor<3>) -> Result<Tensor<3>, TrainError>;

    /// The gradient of this rank's own visual tokens from the gradient of the gathered
    /// ones (the identity on one device, a reduce-scatter in MM-SP).
    fn scatter_visual_grad(&self, grad: Tensor<3>) -> Result<Tensor<3>, TrainError>;

    /// `text` (`[batch, seq, hidden]`) with the placeholder rows taken from `visual`.
    fn splice(
        &self,
        model: &Vlm,
        text: Tensor<3>,
        visual: Option<Tensor<3>>,
    ) -> Result<Tensor<3>, TrainError>;

    /// The rows of this rank's `[batch, seq]` layout whose next token is supervised,
    /// and what each predicts: the rows the loss reads from the last text layer.
    fn supervised_rows(&self) -> Result<SupervisedRows, TrainError>;
}

/// The loss (summed over supervised next tokens, divided by `normaliser`) of one
/// micro-batch on one device and the gradients of the model's trainable parameters.
///
/// `labels` are aligned with the input ids (shifted inside); placeholder positions
/// are never supervised. `model` lives on an autodiff device.
pub fn loss_and_grads(
    model: &Vlm,
    input: VlmInput,
    labels: Tensor<2, Int>,
    normaliser: f32,
    mode: Recompute,
) -> Result<(f32, GradientsParams), TrainError> {
    if model.text_attention() == AttentionImpl::Sharded {
        return Err(TrainError::Parallel(
            "loss_and_grads runs on one device; sequence-parallel ranks \
             (AttentionImpl::Sharded) go through the MM-SP step"
                .into(),
        ));
    }
    let labels = model.unsupervise_placeholders(&input.input_ids, labels);
    let (pixels, given_visual) = match input.visual {
        VisualInput::None => (None, None),
        VisualInput::Pixels(pixels) => (Some(pixels), None),
        VisualInput::Embeddings(tokens) => (None, Some(tokens)),
    };
    let hooks = OneDevice {
        ids: input.input_ids.clone(),
        labels,
    };
    let input = StepInput {
        pixels,
        given_visual,
        ids: input.input_ids,
        position_ids: input.position_ids,
    };
    run_step(model, input, &hooks, normaliser, mode)
}

/// The hooks of a step on one device: nothing to gather or scatter, placeholders
/// spliced by id, the loss on the rows whose next token is supervised.
struct OneDevice {
    ids: Tensor<2, Int>,
    labels: Tensor<2, Int>,
}

impl StepHooks for OneDevice {
    fn gather_visual(&self, local: Tensor<3>) -> Result<Tensor<3>, TrainError> {
        Ok(local)
    }

    fn scatter_visual_grad(&self, grad: Tensor<3>) -> Result<Tensor<3>, TrainError> {
        Ok(grad)
    }

    fn splice(
        &self,
        model: &Vlm,
        text: Tensor<3>,
        visual: Option<Tensor<3>>,
    ) -> Result<Tensor<3>, TrainError> {
        // The ids are read on the host: their device does not matter.
        Ok(model.splice(text, &self.ids, visual)?)
    }

    fn supervised_rows(&self) -> Result<SupervisedRows, TrainError> {
        // Labels aligned with the inputs: row t predicts labels[t + 1].
        Ok(SupervisedRows::of(&self.labels, 1)?)
    }
}

/// The vision stage's forward: this rank's visual tokens, and what its backward needs.
#[allow(clippy::large_enum_variant)] // one per step
enum VisionForward {
    /// Plain autodiff: the tokens, tracked back to the parameters.
    Tracked(Tensor<3>),
    /// Recomputed: the encoder output (untracked), its grid, and each layer's kept part.
    Kept {
        pixels: Tensor<4>,
        grid: (usize, usize),
        out: Tensor<3>,
        kept: Vec<stack::Kept>,
    },
}

/// One micro-batch's loss and gradients, stage by stage: vision (this rank's frames),
/// the hooks' gather, embed + splice, text layers, head; then the backward in reverse,
/// through the hooks' scatter back into the vision stage. Under [`Recompute::None`]
/// each of the two stacks keeps its autodiff graph; otherwise the forward runs without
/// autodiff and every layer is replayed from what `mode` kept.
pub fn run_step(
    model: &Vlm,
    input: StepInput,
    hooks: &dyn StepHooks,
    normaliser: f32,
    mode: Recompute,
) -> Result<(f32, GradientsParams), TrainError> {
    let normaliser = normaliser.max(f32::MIN_POSITIVE);
    // The model without autodiff, for the forward passes of the recomputed modes.
    let plain = (mode != Recompute::None).then(|| model.valid());
    let mut into = GradientsParams::new();
    let vision_trains = trains(&model.vision_tower) || trains(&model.mm_projector);

    // 1. Vision: this rank's frames, then the tokens the text splices.
    let vision = input.pixels.map(|pixels| {
        if mode == Recompute::None {
            let tokens = model.encode_frames(pixels);
            (tokens.clone().detach(), VisionForward::Tracked(tokens))
        } else {
            let plain = plain
                .as_ref()
                .expect("recomputed modes hold the plain model");
            let pixels = pixels.inner();
            let (x, grid) = plain.vision_stem(pixels.clone());
            let (out, kept) = forward_stack(plain.vision_layers(), &(), x, mode.for_vision());
            let tokens = plain.project(out.clone(), grid);
            let forward = VisionForward::Kept {
                pixels,
                grid,
                out,
                kept,
            };
            (tokens, forward)
        }
    });
    let (gathered, vision) = match vision {
        Some((local, forward)) => (Some(hooks.gather_visual(local)?), Some(forward)),
        None => (input.given_visual.map(|t| t.detach()), None),
    };
    // The spliced visual tokens as a leaf of the text stage (tracked, untracked values).
    let visual_leaf = |tokens: &Tensor<3>| {
        let tokens = tokens.clone().autodiff();
        if vision.is_some() && vision_trains {
            tokens.require_grad()
        } else {
            tokens
        }
    };

    // 2. Text: embed + splice, the layers, the head and loss; backward to the splice.
    let (value, d_visual) = if mode == Recompute::None {
        let leaf = gathered.as_ref().map(visual_leaf);
        let mut x = hooks.splice(model, model.embed_tokens(input.ids), leaf.clone())?;
        let rope = model.text_context(input.position_ids);
        for layer in model.text_layers() {
            x = layer.forward(x, &rope);
        }
        // The head runs on slices of the supervised rows from the untracked output;
        // the layers' graph then takes the output's gradient.
        let supervised = hooks.supervised_rows()?;
        let (value, grad) =
            head_backward(model, x.clone().inner(), &supervised, normaliser, &mut into)?;
        let mut grads = surrogate(x, grad.autodiff()).backward();
        take_grads(model, &mut grads, &mut into);
        (value, leaf.map(|l| grad_or_zeros(&l, &grads)))
    } else {
        let plain = plain
            .as_ref()
            .expect("recomputed modes hold the plain model");
        let plain_visual = gathered.clone().map(Tensor::inner);
        let embeds = hooks.splice(
            plain,
            plain.embed_tokens(input.ids.clone().inner()),
            plain_visual,
        )?;
        let rope = plain.text_context(input.position_ids.clone().inner());
        let (hidden, kept) = forward_stack(plain.text_layers(), &rope, embeds, mode);
        drop(rope);
        let supervised = hooks.supervised_rows()?;
        let (value, grad) = head_backward(model, hidden, &supervised, normaliser, &mut into)?;
        let rope = model.text_context(input.position_ids);
        let grad = backward_stack(model, model.text_layers(), &rope, kept, grad, &mut into);
        drop(rope);
        let leaf = gathered.as_ref().map(visual_leaf);
        let embeds = hooks.splice(model, model.embed_tokens(input.ids), leaf.clone())?;
        let mut grads = surrogate(embeds, grad).backward();
        take_grads(model, &mut grads, &mut into);
        (value, leaf.map(|l| grad_or_zeros(&l, &grads)))
    };

    // 3. Vision backward: the visual tokens' gradient back to this rank's frames.
    let (Some(vision), Some(d_visual)) = (vision, d_visual) else {
        return Ok((value, into));
    };
    if !vision_trains {
        return Ok((value, into));
    }
    let d_local = hooks.scatter_visual_grad(d_visual.inner())?;
    match vision {
        VisionForward::Tracked(tokens) => {
            let d_local = d_local.autodiff();
            let mut grads = surrogate(tokens, d_local).backward();
            take_grads(model, &mut grads, &mut into);
        }
        VisionForward::Kept {
            pixels,
            grid,
            out,
            kept,
        } => {
            let tower_trains = trains(&model.vision_tower);
            let leaf = match tower_trains {
                true => out.autodiff().require_grad(),
                false => out.autodiff(),
            };
            let tokens = model.project(leaf.clone(), grid);
            let mut grads = surrogate(tokens, d_local.autodiff()).backward();
            take_grads(model, &mut grads, &mut into);
            if tower_trains {
                let grad = grad_or_zeros(&leaf, &grads);
                drop(grads);
                let grad = backward_stack(model, model.vision_layers(), &(), kept, grad, &mut into);
                let (x, _) = model.vision_stem(pixels.autodiff());
                let mut grads = surrogate(x, grad).backward();
                take_grads(model, &mut grads, &mut into);
            }
        }
    }
    Ok((value, into))
}
