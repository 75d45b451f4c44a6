//! The actor's pass of a GRPO update: a group's responses through the policy under
//! autodiff, the loss of their log-probs, and its gradients.
//!
//! With plain autodiff the pass keeps every activation until the backward: at the
//! 1.5B shape a 256-frame prompt (~50k tokens) makes that hundreds of GB.
//! [`recomputed_grads`] runs it the way the trainer's recomputation does
//! (`crate::remat`): the text layers forward without autodiff, keeping each layer's
//! input (and, attention-aware, its attention output and LSE), the head and the GRPO
//! loss under autodiff on the last layer's output, then every layer replayed last to
//! first from what was kept. It serves a rank's zigzag share of the rows under
//! sequence parallelism ([`super::sp_logprobs::SpLogprobs::actor_grads`]; only the
//! rows, their positions and how the log-probs are read off differ: [`ActorRows`]).
//! One device runs the same recomputation over the group's prompt once and its
//! responses as a batch ([`super::shared_prefix`]).

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Int, Tensor};
use longview_models::Vlm;

use super::logprobs::{ResponseLogprobs, Rollout};
use crate::error::TrainError;
use crate::remat::Recompute;
use crate::remat::stack::{backward_stack, forward_stack, grad_or_zeros, surrogate, take_grads};

/// Maps a group's tracked log-probs to its loss (`[1]`, tracked) and statistics.
pub type ActorLoss<'a> =
    &'a mut dyn FnMut(ResponseLogprobs) -> Result<(Tensor<1>, Vec<f32>), TrainError>;

/// The loss's statistics and the gradients of the model's trainable parameters from
/// `actor` (the group's tracked log-probs; `None` when every response is empty).
pub fn actor_grads_plain(
    model: &Vlm,
    actor: Option<ResponseLogprobs>,
    loss_of: ActorLoss<'_>,
) -> Result<Option<(Vec<f32>, GradientsParams)>, TrainError> {
    let Some(actor) = actor else {
        return Ok(None);
    };
    let (loss, stats) = loss_of(actor)?;
    Ok(Some((
        stats,
        GradientsParams::from_grads(loss.backward(), model),
    )))
}

/// The rows of a group's sequences that one actor pass runs through the text layers,
/// and how the response tokens' log-probs are read off the last layer's output.
pub(crate) trait ActorRows {
    /// The text layers' input rows, `[responses, rows, hidden]` (`model` and
    /// `rollout.visual` both with or both without autodiff).
    fn embeds(
        &self,
        model: &Vlm,
        rollout: &Rollout<'_>,
        device: &Device,
    ) -> Result<Tensor<3>, TrainError>;

    /// The rows' position ids, `[responses, rows]`.
    fn position_ids(&self, device: &Device) -> Tensor<2, Int>;

    /// The log-probs (tracked) of the response tokens the rows `hidden` predict.
    fn logprobs(
        &self,
        model: &Vlm,
        rollout: &Rollout<'_>,
        hidden: Tensor<3>,
        device: &Device,
    ) -> ResponseLogprobs;
}

/// The recomputed actor pass over `rows`: the loss's statistics and the gradients of
/// `model`'s trainable parameters. Under sequence parallelism `model` carries the
/// sharded attention and the scheme is installed by the caller; the gradients are
/// then this rank's part.
pub(crate) fn recomputed_grads(
    model: &Vlm,
    rollout: &Rollout<'_>,
    rows: &dyn ActorRows,
    mode: Recompute,
    device: &Device,
    loss_of: ActorLoss<'_>,
) -> Result<(Vec<f32>, GradientsParams), TrainError> {
    let inner = device.clone().inner();

    // Forward without autodiff, keeping what `mode` names per layer.
    let plain = model.valid();
    let visual = rollout.visual.map(|v| v.clone().inner());
    let plain_rollout = Rollout {
        visual: visual.as_ref(),
        ..*rollout
    };
    let embeds = rows.embeds(&plain, &plain_rollout, &inner)?;
    let rope = plain.text_context(rows.position_ids(&inner));
    let (hidden, kept) = forward_stack(plain.text_layers(), &rope, embeds, mode);
    drop((rope, plain));

    // The head and the loss under autodiff, from the last layer's output.
    let leaf = hidden.autodiff().require_grad();
    let (loss, stats) = loss_of(rows.logprobs(model, rollout, leaf.clone(), device))?;
    let mut into = GradientsParams::new();
    let mut grads = loss.backward();
    take_grads(model, &mut grads, &mut into);
    let d_hidden = grad_or_zeros(&leaf, &grads);
    drop(grads);

    // The layers replayed last to first, then the token embeddings.
    let rope = model.text_context(rows.position_ids(device));
    let d_embeds = backward_stack(model, model.text_layers(), &rope, kept, d_hidden, &mut into);
    drop(rope);
    let embeds = rows.embeds(model, rollout, device)?;
    let mut grads = surrogate(embeds, d_embeds).backward();
    take_grads(model, &mut grads, &mut into);
    Ok((stats, into))
}
