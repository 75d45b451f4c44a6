//! The GRPO log-prob passes sequence-parallel: each sequence of prompt + response
//! (one row of the group's batch) is cut zigzag over the ranks of a group and runs
//! through the text layers with zigzag ring attention; every rank takes the
//! log-probabilities of the response tokens its rows predict. The old-policy and
//! reference passes sum the ranks' parts into whole `[responses, max_len]` tensors;
//! the actor's loss is taken on each rank's own tokens, and the gradients summed over
//! the group (`mmsp::all_reduce_grads`) are the one-device gradients.

use std::sync::Arc;

use burn::tensor::{Device, Int, Tensor, TensorData};
use longview_comm::{Communicator, ReduceOp};
use longview_models::Vlm;
use longview_models::attention::AttentionImpl;
use longview_parallel::autodiff::DistributedAttention;
use longview_parallel::inference::causal_zigzag_ring;
use longview_parallel::layout::{SeqLayout, shard};
use longview_parallel::model::install;

use super::logprobs::{ResponseLogprobs, Rollout, token_logprobs};
use crate::error::TrainError;

/// A rank's sequence-parallel group for the log-prob passes.
pub struct SpLogprobs<C: Communicator + Send + Sync + 'static> {
    comm: C,
    ring: Arc<dyn DistributedAttention>,
    scale: f64,
}

fn comm_error(what: &'static str) -> impl Fn(longview_comm::CommError) -> TrainError {
    move |e| TrainError::Parallel(format!("GRPO log-probs ({what}): {e}"))
}

impl<C: Communicator + Send + Sync + 'static> SpLogprobs<C> {
    /// Binds every rank of `comm` for a model whose heads have `head_dim` channels.
    pub fn new(comm: C, head_dim: usize) -> Result<Self, TrainError> {
        let (ring, scale) =
            causal_zigzag_ring(&comm, head_dim).map_err(comm_error("ring channels"))?;
        Ok(SpLogprobs { comm, ring, scale })
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
        let (world, rank) = (self.comm.world_size(), self.comm.rank());
        let (n, longest) = (rollout.responses.len(), rollout.longest());
        if longest == 0 || rollout.prompt.is_empty() {
            return Ok(None);
        }
        // Zigzag needs a multiple of 2P rows; padding goes after every response, where
        // causal attention keeps it from the rows that matter.
        let len = (rollout.prompt.len() + longest).div_ceil(2 * world) * 2 * world;
        let embeds = rollout.embeds(model, len, device)?;
        let layout = SeqLayout::Zigzag;
        let sharding = |e: longview_parallel::ParallelError| TrainError::Parallel(e.to_string());
        let local = shard(embeds, 1, layout, rank, world).map_err(sharding)?;
        let positions = layout.positions(len, rank, world).map_err(sharding)?;
        let rows = positions.len();
        let pos: Vec<i64> = (0..n)
            .flat_map(|_| positions.iter().map(|&p| p as i64))
            .collect();
        let rope = model.text_context(Tensor::from_data(TensorData::new(pos, [n, rows]), device));
        let sharded = model
            .clone()
            .with_attention(model.vision_attention(), AttentionImpl::Sharded);
        let mut x = local;
        {
            let _ring = install(self.ring.clone(), true, self.scale, "GRPO zigzag ring");
            for layer in sharded.text_layers() {
                x = layer.forward(x, &rope);
            }
        }
        // This rank's rows that predict response tokens: global row p - 1 + k
        // predicts token k.
        let first = rollout.prompt.len() - 1;
        let (rows, ks): (Vec<i64>, Vec<usize>) = positions
            .iter()
            .enumerate()
            .filter(|&(_, &p)| p >= first && p < first + longest)
            .map(|(row, &p)| (row as i64, p - first))
            .unzip();
        let m = ks.len();
        let zeros = Tensor::<2>::zeros([n, longest], device);
        if m == 0 {
            // No token here, but the backward must still take part in the ring's.
            return Ok(Some(ResponseLogprobs {
                logp: zeros.clone() + x.sum().mul_scalar(0.0).reshape([1, 1]),
                mask: zeros.clone(),
                entropy: zeros,
            }));
        }
        let rows = Tensor::<1, Int>::from_data(TensorData::new(rows, [m]), device);
        let part = token_logprobs(model, rollout, x.select(1, rows), &ks, device);
        // Place column j at response position ks[j]: a [m, longest] 0/1 matrix.
        let mut place = vec![0f32; m * longest];
        for (j, &k) in ks.iter().enumerate() {
            place[j * longest + k] = 1.0;
        }
        let place = Tensor::<2>::from_data(TensorData::new(place, [m, longest]), device);
        Ok(Some(ResponseLogprobs {
            logp: part.logp.matmul(place.clone()),
            mask: part.mask.matmul(place.clone()),
            entropy: part.entropy.matmul(place),
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
