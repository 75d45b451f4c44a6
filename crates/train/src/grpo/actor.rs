//! The actor's pass of a GRPO update: a group's responses through the policy under
//! autodiff, the loss of their log-probs, and its gradients.
//!
//! With plain autodiff the pass keeps every activation of `G x (prompt + response)`
//! tokens until the backward: at the 1.5B shape a 256-frame prompt (~50k tokens) makes
//! that hundreds of GB. [`actor_grads_recomputed`] runs it the way the trainer's
//! recomputation does (`crate::remat`): the text layers forward without autodiff,
//! keeping each layer's input (and, attention-aware, its attention output and LSE),
//! the head and the GRPO loss under autodiff on the last layer's output, then every
//! layer replayed last to first from what was kept. The gradients equal plain
//! autodiff's (test `recomputed_actor_gradients_equal_plain_autodiff`).

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor};
use longview_models::Vlm;
use longview_models::vila::default_position_ids;

use super::logprobs::{ResponseLogprobs, Rollout, token_logprobs};
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

/// [`actor_grads_plain`] over the group's responses with the text layers recomputed
/// in the backward (`mode`: `Layers` or `AttentionAware`). The visual tokens of the
/// rollout are constants (the vision tower stays frozen in GRPO).
pub fn actor_grads_recomputed(
    model: &Vlm,
    rollout: &Rollout<'_>,
    mode: Recompute,
    device: &Device,
    loss_of: ActorLoss<'_>,
) -> Result<Option<(Vec<f32>, GradientsParams)>, TrainError> {
    let longest = rollout.longest();
    if longest == 0 || rollout.prompt.is_empty() {
        return Ok(None);
    }
    let n = rollout.responses.len();
    let len = rollout.prompt.len() + longest;
    let inner = device.clone().inner();

    // Forward without autodiff, keeping what `mode` names per layer.
    let plain = model.valid();
    let visual = rollout.visual.map(|v| v.clone().inner());
    let plain_rollout = Rollout {
        visual: visual.as_ref(),
        ..*rollout
    };
    let embeds = plain_rollout.embeds(&plain, len, &inner)?;
    let rope = plain.text_context(default_position_ids(n, len, &inner));
    let (hidden, kept) = forward_stack(plain.text_layers(), &rope, embeds, mode);
    drop((rope, plain));

    // The head and the loss under autodiff, from the last layer's output.
    let leaf = hidden.autodiff().require_grad();
    // Row prompt_len - 1 + k predicts response token k.
    let rows = leaf.clone().narrow(1, rollout.prompt.len() - 1, longest);
    let ks: Vec<usize> = (0..longest).collect();
    let (loss, stats) = loss_of(token_logprobs(model, rollout, rows, &ks, device))?;
    let mut into = GradientsParams::new();
    let mut grads = loss.backward();
    take_grads(model, &mut grads, &mut into);
    let d_hidden = grad_or_zeros(&leaf, &grads);
    drop(grads);

    // The layers replayed last to first, then the token embeddings.
    let rope = model.text_context(default_position_ids(n, len, device));
    let d_embeds = backward_stack(model, model.text_layers(), &rope, kept, d_hidden, &mut into);
    drop(rope);
    let embeds = rollout.embeds(model, len, device)?;
    let mut grads = surrogate(embeds, d_embeds).backward();
    take_grads(model, &mut grads, &mut into);
    Ok(Some((stats, into)))
}
