//! The GRPO log-prob passes sequence-parallel: each sequence of prompt + response
//! (one row of the group's batch) is cut over the ranks of a group and runs through
//! the text layers with sequence-parallel attention (the zigzag ring by default;
//! Ulysses or 2D with [`SpLogprobs::with_scheme`], each in its own layout); every rank
//! takes the
//! log-probabilities of the response tokens its rows predict. The old-policy and
//! reference passes sum the ranks' parts into whole `[responses, max_len]` tensors;
//! the actor's loss is taken on each rank's own tokens, and the gradients summed over
//! the group (`mmsp::all_reduce_grads`) are the one-device gradients. The actor's pass
//! can also recompute its layers in the backward ([`SpLogprobs::actor_grads`]: the
//! executor of [`super::actor`] on this rank's rows).

use std::sync::Arc;

use burn::optim::GradientsParams;
use burn::tensor::{Device, Int, Tensor, TensorData};
use longview_comm::{Communicator, ReduceOp};
use longview_models::Vlm;
use longview_models::attention::AttentionImpl;
use longview_parallel::autodiff::DistributedAttention;
use longview_parallel::inference::{Heads, SpScheme, causal_scheme, causal_zigzag_ring};
use longview_parallel::layout::{SeqLayout, shard};
use longview_parallel::model::install;

use super::actor::{ActorLoss, ActorRows, recomputed_grads};
use super::logprobs::{ResponseLogprobs, Rollout, token_logprobs};
use crate::error::TrainError;
use crate::remat::Recompute;

/// A rank's sequence-parallel group for the log-prob passes.
pub struct SpLogprobs<C: Communicator + Send + Sync + 'static> {
    comm: C,
    /// The scheme's attention (on channels of its own), its token layout and name.
    attention: Arc<dyn DistributedAttention>,
    layout: SeqLayout,
    scheme: SpScheme,
    scale: f64,
}

fn sharding(e: longview_parallel::ParallelError) -> TrainError {
    TrainError::Parallel(e.to_string())
}

/// `model` with its text attention sharded (the installed scheme).
fn sharded(model: &Vlm) -> Vlm {
    model
        .clone()
        .with_attention(model.vision_attention(), AttentionImpl::Sharded)
}

fn comm_error(what: &'static str) -> impl Fn(longview_comm::CommError) -> TrainError {
    move |e| TrainError::Parallel(format!("GRPO log-probs ({what}): {e}"))
}

impl<C: Communicator + Send + Sync + 'static> SpLogprobs<C> {
    /// Binds every rank of `comm` for a model whose heads have `head_dim` channels;
    /// the passes run the zigzag ring.
    pub fn new(comm: C, head_dim: usize) -> Result<Self, TrainError> {
        let (attention, scale) =
            causal_zigzag_ring(&comm, head_dim).map_err(comm_error("ring channels"))?;
        Ok(SpLogprobs {
            comm,
            attention,
            layout: SeqLayout::Zigzag,
            scheme: SpScheme::ZigzagRing,
            scale,
        })
    }

    /// [`Self::new`] with the passes on `scheme` (ring, Ulysses or 2D) for a model of
    /// `heads`; a scheme the heads or the group size do not allow is refused with
    /// the rule.
    pub fn with_scheme(comm: C, heads: Heads, scheme: SpScheme) -> Result<Self, TrainError> {
        let (attention, layout, scale) = causal_scheme(&comm, heads, scheme)
            .map_err(|e| TrainError::Parallel(format!("GRPO log-probs on {scheme}: {e}")))?;
        Ok(SpLogprobs {
            comm,
            attention,
            layout,
            scheme,
            scale,
        })
    }

    /// The group's communicator (for summing gradients and statistics).
    pub fn comm(&self) -> &C {
        &self.comm
    }

    /// This rank's part of [`super::logprobs::response_logprobs`]: log-probs (tracked
    /// when the model is), mask and entropy at the response tokens predicted by this
    /// rank's rows, zeros elsewhere; summed over the ranks they are the one-device
    /// tensors. `None` when every response is empty.
    pub fn local(
        &self,
        model: &Vlm,
        rollout: &Rollout<'_>,
        device: &Device,
    ) -> Result<Option<ResponseLogprobs>, TrainError> {
        let Some(rows) = self.rows(rollout)? else {
            return Ok(None);
        };
        let mut x = rows.embeds(model, rollout, device)?;
        let rope = model.text_context(rows.position_ids(device));
        let sharded = sharded(model);
        {
            let _ring = install(self.attention.clone(), true, self.scale, self.what());
            for layer in sharded.text_layers() {
                x = layer.forward(x, &rope);
            }
        }
        Ok(Some(rows.logprobs(model, rollout, x, device)))
    }

    /// The actor's pass on this rank's rows with the text layers recomputed in the
    /// backward (`mode`: `Layers` or `AttentionAware`, whose replay runs the ring's
    /// backward from the kept output and LSE): the loss's statistics and this rank's
    /// gradients, which summed over the group are the one-device gradients. `loss_of`
    /// sees [`Self::local`]'s tensors. `None` when every response is empty.
    pub fn actor_grads(
        &self,
        model: &Vlm,
        rollout: &Rollout<'_>,
        mode: Recompute,
        device: &Device,
        loss_of: ActorLoss<'_>,
    ) -> Result<Option<(Vec<f32>, GradientsParams)>, TrainError> {
        let Some(rows) = self.rows(rollout)? else {
            return Ok(None);
        };
        let sharded = sharded(model);
        let _ring = install(self.attention.clone(), true, self.scale, self.what());
        recomputed_grads(&sharded, rollout, &rows, mode, device, loss_of).map(Some)
    }

    fn what(&self) -> String {
        format!("GRPO log-probs ({})", self.scheme)
    }

    /// This rank's share of the group's rows; `None` when every response is empty.
    fn rows(&self, rollout: &Rollout<'_>) -> Result<Option<ShareRows>, TrainError> {
        let (world, rank) = (self.comm.world_size(), self.comm.rank());
        let longest = rollout.longest();
        if longest == 0 || rollout.prompt.is_empty() {
            return Ok(None);
        }
        // Every scheme's layout needs a multiple of 2P rows; padding goes after every
        // response, where causal attention keeps it from the rows that matter.
        let len = (rollout.prompt.len() + longest).div_ceil(2 * world) * 2 * world;
        let positions = self.layout.positions(len, rank, world).map_err(sharding)?;
        Ok(Some(ShareRows {
            layout: self.layout,
            len,
            rank,
            world,
            positions,
            responses: rollout.responses.len(),
            first: rollout.prompt.len() - 1,
            longest,
        }))
    }

    /// The whole `[responses, max_len]` log-probs (untracked), the same on every rank:
    /// this rank's part summed with the others'.
    pub fn whole(
        &self,
        model: &Vlm,
        rollout: &Rollout<'_>,
        device: &Device,
    ) -> Result<Option<Tensor<2>>, TrainError> {
        let Some(part) = self.local(model, rollout, device)? else {
            return Ok(None);
        };
        let total = self
            .comm
            .all_reduce(part.logp.detach().inner(), ReduceOp::Sum)
            .map_err(comm_error("summing log-probs"))?;
        Ok(Some(total))
    }
}

/// A rank's share of a group's rows: every response padded to `len` rows and cut by
/// `layout`, this rank holding the global rows `positions`.
struct ShareRows {
    layout: SeqLayout,
    len: usize,
    rank: usize,
    world: usize,
    positions: Vec<usize>,
    responses: usize,
    /// The row that predicts the first response token (prompt length - 1).
    first: usize,
    longest: usize,
}

impl ActorRows for ShareRows {
    fn embeds(
        &self,
        model: &Vlm,
        rollout: &Rollout<'_>,
        device: &Device,
    ) -> Result<Tensor<3>, TrainError> {
        let embeds = rollout.embeds(model, self.len, device)?;
        shard(embeds, 1, self.layout, self.rank, self.world).map_err(sharding)
    }

    fn position_ids(&self, device: &Device) -> Tensor<2, Int> {
        let rows = self.positions.len();
        let ids: Vec<i64> = (0..self.responses)
            .flat_map(|_| self.positions.iter().map(|&p| p as i64))
            .collect();
        Tensor::from_data(TensorData::new(ids, [self.responses, rows]), device)
    }

    /// Zeros at the response tokens other ranks' rows predict.
    fn logprobs(
        &self,
        model: &Vlm,
        rollout: &Rollout<'_>,
        hidden: Tensor<3>,
        device: &Device,
    ) -> ResponseLogprobs {
        let (n, longest, first) = (self.responses, self.longest, self.first);
        // Global row first + k predicts token k.
        let (rows, ks): (Vec<i64>, Vec<usize>) = self
            .positions
            .iter()
            .enumerate()
            .filter(|&(_, &p)| p >= first && p < first + longest)
            .map(|(row, &p)| (row as i64, p - first))
            .unzip();
        let m = ks.len();
        let zeros = Tensor::<2>::zeros([n, longest], device);
        if m == 0 {
            // No token here, but the backward must still reach the rows (and through
            // them take part in the ring's backward).
            return ResponseLogprobs {
                logp: zeros.clone() + hidden.sum().mul_scalar(0.0).reshape([1, 1]),
                mask: zeros.clone(),
                entropy: zeros,
            };
        }
        let rows = Tensor::<1, Int>::from_data(TensorData::new(rows, [m]), device);
        let part = token_logprobs(model, rollout, hidden.select(1, rows), &ks, device);
        // Place column j at response position ks[j]: a [m, longest] 0/1 matrix.
        let mut place = vec![0f32; m * longest];
        for (j, &k) in ks.iter().enumerate() {
            place[j * longest + k] = 1.0;
        }
        let place = Tensor::<2>::from_data(TensorData::new(place, [m, longest]), device);
        ResponseLogprobs {
            logp: part.logp.matmul(place.clone()),
            mask: part.mask.matmul(place.clone()),
            entropy: part.entropy.matmul(place),
        }
    }
}
