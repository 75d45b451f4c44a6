//! A group's log-prob passes on one device with its prompt run once.
//!
//! The G responses of a group share their prompt: row for row, its activations are the
//! same in every response (causal attention: a prompt row never sees a response).
//! These passes run the prompt's rows once (`[1, prompt, hidden]`) and the responses'
//! rows as a batch (`[G, longest - 1, hidden]`) whose attention reads the prompt's keys
//! and values followed by its own (causal, queries aligned to the end of the keys).
//! Under autodiff the gradients of every response flow into the one prompt pass. At a
//! 256-frame prompt (~50k tokens) and G = 5 this is a fifth of the work and of the
//! activations of running prompt + response G times ([`super::logprobs::response_logprobs`],
//! the layout the tests hold these passes to).
//!
//! Untracked, the responses' attention is split at the prompt (two partial attentions
//! merged by LSE, `prefix_attention`), so the prompt's keys and values are not copied
//! per response; tracked, they are concatenated G times (`over_prefix`).
//!
//! The response rows fed in are tokens `0..longest - 1`: the prompt's last row predicts
//! token 0, response row `k - 1` predicts token `k`, and the last token predicts
//! nothing that is scored.

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Int, Tensor, TensorData};
use longview_models::Vlm;
use longview_models::attention::{
    AttentionImpl, AttentionInput, AttentionMask, SplitAtAttention, attend_with_lse,
    attention_input_grads,
};
use longview_models::vila::rope::Rope;

use super::actor::ActorLoss;
use super::logprobs::{ResponseLogprobs, Rollout, token_logprobs};
use super::prefix_attention::{
    PrefixGrads, attend_over_prefix, prefix_input_grads, splits_at_prompt,
};
use crate::error::TrainError;
use crate::remat::Recompute;
use crate::remat::stack::{grad_or_zeros, surrogate, take_grads};

/// A group's rows at one depth of the text stack: the prompt's `[1, prompt, hidden]`
/// and the responses' `[G, longest - 1, hidden]` (`None` when the longest response has
/// one token).
#[derive(Clone)]
struct GroupRows {
    prompt: Tensor<3>,
    responses: Option<Tensor<3>>,
}

/// The RoPE tables of both parts: positions `0..prompt`, and `prompt..` for every
/// response.
struct GroupRope {
    prompt: Rope,
    responses: Option<Rope>,
}

/// The group's shape.
#[derive(Debug, Clone, Copy)]
struct Shape {
    responses: usize,
    prompt: usize,
    longest: usize,
}

impl Shape {
    /// `None` when there is nothing to score (no prompt, or every response empty).
    fn of(rollout: &Rollout<'_>) -> Option<Self> {
        let longest = rollout.longest();
        (longest > 0 && !rollout.prompt.is_empty()).then_some(Shape {
            responses: rollout.responses.len(),
            prompt: rollout.prompt.len(),
            longest,
        })
    }

    /// Response rows run through the layers per response.
    fn fed(&self) -> usize {
        self.longest - 1
    }

    /// The prompt's token embeddings with the visual tokens spliced in, and the
    /// responses' fed tokens (right-padded with id 0, embedded as text: a sampled
    /// placeholder id is text to the rollout too).
    fn embeds(
        &self,
        model: &Vlm,
        rollout: &Rollout<'_>,
        device: &Device,
    ) -> Result<GroupRows, TrainError> {
        let ids: Vec<i64> = rollout.prompt.iter().map(|&t| t as i64).collect();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, self.prompt]), device);
        let prompt = model.splice(
            model.embed_tokens(ids.clone()),
            &ids,
            rollout.visual.cloned(),
        )?;
        let responses = (self.fed() > 0).then(|| {
            let mut ids = Vec::with_capacity(self.responses * self.fed());
            for response in rollout.responses {
                for k in 0..self.fed() {
                    ids.push(response.get(k).map_or(0, |&t| t as i64));
                }
            }
            let ids = TensorData::new(ids, [self.responses, self.fed()]);
            model.embed_tokens(Tensor::from_data(ids, device))
        });
        Ok(GroupRows { prompt, responses })
    }

    fn rope(&self, model: &Vlm, device: &Device) -> GroupRope {
        let positions = |start: usize, len: usize, batch: usize| {
            Tensor::<1, Int>::arange(start as i64..(start + len) as i64, device)
                .unsqueeze_dim::<2>(0)
                .repeat_dim(0, batch)
        };
        GroupRope {
            prompt: model.text_context(positions(0, self.prompt, 1)),
            responses: (self.fed() > 0)
                .then(|| model.text_context(positions(self.prompt, self.fed(), self.responses))),
        }
    }

    /// The last layer's rows that predict response tokens `0..longest`:
    /// `[G, longest, hidden]`.
    fn predicting(&self, hidden: GroupRows) -> Tensor<3> {
        let last = hidden
            .prompt
            .narrow(1, self.prompt - 1, 1)
            .repeat_dim(0, self.responses);
        match hidden.responses {
            Some(responses) => Tensor::cat(vec![last, responses], 1),
            None => last,
        }
    }

    fn logprobs(
        &self,
        model: &Vlm,
        rollout: &Rollout<'_>,
        hidden: GroupRows,
        device: &Device,
    ) -> ResponseLogprobs {
        let ks: Vec<usize> = (0..self.longest).collect();
        token_logprobs(model, rollout, self.predicting(hidden), &ks, device)
    }
}

/// Whether the responses' attention runs as two merged parts without copies of the
/// prompt's K/V (`prefix_attention`): untracked inputs on one device.
fn split_at_prompt(implementation: AttentionImpl, own: &AttentionInput) -> bool {
    splits_at_prompt(implementation) && !own.q.is_autodiff()
}

/// The responses' attention input over the prompt's keys and values, then their own:
/// `[G, kv_heads, prompt + fed, head_dim]`, causal with the queries at the end. The
/// tracked passes' layout: G copies of the prompt's K/V.
fn over_prefix(prefix: &AttentionInput, own: AttentionInput) -> AttentionInput {
    let g = own.q.dims()[0];
    let widen = |shared: &Tensor<4>, own: Tensor<4>| {
        let [_, heads, len, dim] = shared.dims();
        Tensor::cat(vec![shared.clone().expand([g, heads, len, dim]), own], 2)
    };
    AttentionInput {
        k: widen(&prefix.k, own.k),
        v: widen(&prefix.v, own.v),
        q: own.q,
        mask: AttentionMask::Causal,
        scale: own.scale,
    }
}

/// Both parts through one layer (tracked when the inputs are: one device runs the
/// flash or the reference attention, whose output from `attend_with_lse` is
/// differentiable).
fn layer_forward<L: SplitAtAttention<Context = Rope>>(
    layer: &L,
    x: GroupRows,
    rope: &GroupRope,
) -> GroupRows {
    layer_forward_keeping(layer, x, rope).0
}

/// The responses' log-probs at the rollout's temperature (tracked when `model` is);
/// `None` when every response is empty.
pub fn shared_prefix_logprobs(
    model: &Vlm,
    rollout: &Rollout<'_>,
    device: &Device,
) -> Result<Option<ResponseLogprobs>, TrainError> {
    let Some(shape) = Shape::of(rollout) else {
        return Ok(None);
    };
    let mut x = shape.embeds(model, rollout, device)?;
    let rope = shape.rope(model, device);
    for layer in model.text_layers() {
        x = layer_forward(layer, x, &rope);
    }
    Ok(Some(shape.logprobs(model, rollout, x, device)))
}

/// What the recomputed pass keeps of one layer: its input rows and, attention-aware,
/// both parts' attention output and LSE (untracked).
struct Kept {
    x: GroupRows,
    attention: Option<KeptAttention>,
}

struct KeptAttention {
    prompt: (Tensor<4>, Option<Tensor<3>>),
    responses: Option<(Tensor<4>, Option<Tensor<3>>)>,
}

/// The actor's loss statistics and gradients with the text layers recomputed in the
/// backward (`mode`: `Layers` or `AttentionAware`), the way the trainer's `remat`
/// recomputes a stack: forward without autodiff keeping each layer's input (and
/// attention outputs), the head and loss under autodiff, then each layer replayed last
/// to first. The gradients equal plain autodiff's over the same passes (test).
pub fn shared_prefix_grads_recomputed(
    model: &Vlm,
    rollout: &Rollout<'_>,
    mode: Recompute,
    device: &Device,
    loss_of: ActorLoss<'_>,
) -> Result<Option<(Vec<f32>, GradientsParams)>, TrainError> {
    let Some(shape) = Shape::of(rollout) else {
        return Ok(None);
    };
    let inner = device.clone().inner();
    let plain = model.valid();
    let visual = rollout.visual.map(|v| v.clone().inner());
    let plain_rollout = Rollout {
        visual: visual.as_ref(),
        ..*rollout
    };
    let mut x = shape.embeds(&plain, &plain_rollout, &inner)?;
    let rope = shape.rope(&plain, &inner);
    let mut kept = Vec::with_capacity(plain.text_layers().len());
    for layer in plain.text_layers() {
        let next = if mode == Recompute::AttentionAware {
            let (next, attention) = layer_forward_keeping(layer, x.clone(), &rope);
            kept.push(Kept {
                x,
                attention: Some(attention),
            });
            next
        } else {
            let next = layer_forward(layer, x.clone(), &rope);
            kept.push(Kept { x, attention: None });
            next
        };
        x = next;
    }
    drop((rope, plain));

    // The head and the loss under autodiff, from the last layer's output.
    let leaves = track(x);
    let (loss, stats) = loss_of(shape.logprobs(model, rollout, leaves.clone(), device))?;
    let mut into = GradientsParams::new();
    let mut grads = loss.backward();
    take_grads(model, &mut grads, &mut into);
    let mut grad = leaf_grads(&leaves, &grads);
    drop(grads);

    let rope = shape.rope(model, device);
    for (layer, kept) in model.text_layers().iter().zip(kept).rev() {
        grad = match kept.attention {
            None => {
                let x = track(kept.x);
                let out = layer_forward(layer, x.clone(), &rope);
                backward_into(model, out, grad, &x, &mut into)
            }
            Some(attention) => {
                replay_attention_aware(model, layer, kept.x, attention, &rope, grad, &mut into)
            }
        };
    }
    drop(rope);
    let embeds = shape.embeds(model, rollout, device)?;
    let mut grads = surrogate_rows(embeds, grad).backward();
    take_grads(model, &mut grads, &mut into);
    Ok(Some((stats, into)))
}

/// Both parts through one layer, also returning their attention outputs and LSEs.
fn layer_forward_keeping<L: SplitAtAttention<Context = Rope>>(
    layer: &L,
    x: GroupRows,
    rope: &GroupRope,
) -> (GroupRows, KeptAttention) {
    let implementation = layer.attention_impl();
    let prompt_input = layer.attention_input(x.prompt.clone(), &rope.prompt);
    let responses = x.responses.map(|rows| {
        let own = layer.attention_input(rows.clone(), rope.responses.as_ref().unwrap());
        let (o, lse) = if split_at_prompt(implementation, &own) {
            let (o, lse) = attend_over_prefix(implementation, &prompt_input, own);
            (o, Some(lse))
        } else {
            attend_with_lse(implementation, over_prefix(&prompt_input, own))
        };
        (layer.after_attention(rows, o.clone()), (o, lse))
    });
    let (o, lse) = attend_with_lse(implementation, prompt_input);
    let prompt = layer.after_attention(x.prompt, o.clone());
    let (responses, kept_responses) = match responses {
        Some((rows, kept)) => (Some(rows), Some(kept)),
        None => (None, None),
    };
    let kept = KeptAttention {
        prompt: (o, lse),
        responses: kept_responses,
    };
    (GroupRows { prompt, responses }, kept)
}

/// Untracked rows made leaves of a new autodiff graph.
fn track(x: GroupRows) -> GroupRows {
    GroupRows {
        prompt: x.prompt.autodiff().require_grad(),
        responses: x.responses.map(|r| r.autodiff().require_grad()),
    }
}

fn leaf_grads(leaves: &GroupRows, grads: &burn::tensor::Gradients) -> GroupRows {
    GroupRows {
        prompt: grad_or_zeros(&leaves.prompt, grads),
        responses: leaves.responses.as_ref().map(|r| grad_or_zeros(r, grads)),
    }
}

/// `surrogate` of both parts: its backward sends `grad` into the graph behind `out`.
fn surrogate_rows(out: GroupRows, grad: GroupRows) -> Tensor<1> {
    let total = surrogate(out.prompt, grad.prompt);
    match (out.responses, grad.responses) {
        (Some(out), Some(g)) => total + surrogate(out, g),
        _ => total,
    }
}

/// Backpropagates `grad` through `out` (built from the leaves `x`), moving the
/// parameters' gradients into `into`; returns the gradient of `x`.
fn backward_into(
    model: &Vlm,
    out: GroupRows,
    grad: GroupRows,
    x: &GroupRows,
    into: &mut GradientsParams,
) -> GroupRows {
    let mut grads = surrogate_rows(out, grad).backward();
    take_grads(model, &mut grads, into);
    leaf_grads(x, &grads)
}

/// One layer's backward from its kept attention outputs: the parts after the
/// attention replayed under autodiff (giving dO), the attention's backward from O and
/// LSE (the forward does not run again), then the parts before it.
fn replay_attention_aware<L: SplitAtAttention<Context = Rope>>(
    model: &Vlm,
    layer: &L,
    x: GroupRows,
    attention: KeptAttention,
    rope: &GroupRope,
    grad: GroupRows,
    into: &mut GradientsParams,
) -> GroupRows {
    let implementation = layer.attention_impl();
    let KeptAttention {
        prompt: (o_prompt, lse_prompt),
        responses: kept_responses,
    } = attention;
    // After the attention: o_proj, residuals, MLP.
    let leaves = track(x.clone());
    let o_prompt_leaf = o_prompt.clone().autodiff().require_grad();
    let o_responses_leaf = kept_responses
        .as_ref()
        .map(|(o, _)| o.clone().autodiff().require_grad());
    let out = GroupRows {
        prompt: layer.after_attention(leaves.prompt.clone(), o_prompt_leaf.clone()),
        responses: leaves
            .responses
            .clone()
            .zip(o_responses_leaf.clone())
            .map(|(rows, o)| layer.after_attention(rows, o)),
    };
    let mut grads = surrogate_rows(out, grad).backward();
    take_grads(model, &mut grads, into);
    let residual = leaf_grads(&leaves, &grads);
    let d_o_prompt = grad_or_zeros(&o_prompt_leaf, &grads);
    let d_o_responses = o_responses_leaf.map(|o| grad_or_zeros(&o, &grads));
    drop(grads);

    // The attention's backward, then the norm, projections and RoPE before it.
    let leaves = track(x);
    let prompt_input = layer.attention_input(leaves.prompt.clone(), &rope.prompt);
    let (dq, dk, dv) = attention_input_grads(
        implementation,
        prompt_input.clone(),
        o_prompt.autodiff(),
        lse_prompt.map(|l| l.autodiff()),
        d_o_prompt,
    );
    let mut total = surrogate(prompt_input.q.clone(), dq)
        + surrogate(prompt_input.k.clone(), dk)
        + surrogate(prompt_input.v.clone(), dv);
    if let (Some(rows), Some((o, lse)), Some(d_o)) =
        (leaves.responses.clone(), kept_responses, d_o_responses)
    {
        let own = layer.attention_input(rows, rope.responses.as_ref().unwrap());
        // The kept forward ran untracked: split at the prompt wherever the
        // implementation allows it (it then kept an LSE).
        match lse {
            Some(lse) if splits_at_prompt(implementation) => {
                let PrefixGrads {
                    dq,
                    dk_own,
                    dv_own,
                    dk_prompt,
                    dv_prompt,
                } = prefix_input_grads(
                    implementation,
                    &prompt_input,
                    own.clone(),
                    o.autodiff(),
                    lse.autodiff(),
                    d_o,
                );
                total = total
                    + surrogate(own.q, dq)
                    + surrogate(own.k, dk_own)
                    + surrogate(own.v, dv_own)
                    + surrogate(prompt_input.k.clone(), dk_prompt)
                    + surrogate(prompt_input.v.clone(), dv_prompt);
            }
            lse => {
                let joined = over_prefix(&prompt_input, own);
                let (dq, dk, dv) = attention_input_grads(
                    implementation,
                    joined.clone(),
                    o.autodiff(),
                    lse.map(|l| l.autodiff()),
                    d_o,
                );
                // Through the concatenation: dK and dV of the prompt's rows summed over
                // the responses into the prompt's projections.
                total = total
                    + surrogate(joined.q, dq)
                    + surrogate(joined.k, dk)
                    + surrogate(joined.v, dv);
            }
        }
    }
    let mut grads = total.backward();
    take_grads(model, &mut grads, into);
    let before = leaf_grads(&leaves, &grads);
    GroupRows {
        prompt: residual.prompt + before.prompt,
        responses: residual.responses.zip(before.responses).map(|(a, b)| a + b),
    }
}
