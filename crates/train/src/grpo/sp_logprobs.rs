//! The GRPO log-prob passes sequence-parallel: each sequence of prompt + response
//! (one row of the group's batch) is cut zigzag over the ranks of a group and runs
//! through the text layers with zigzag ring attention; every rank takes the
//! log-probabilities of the response tokens its rows predict. The old-policy and
//! reference passes sum the ranks' parts into whole `[responses, max_len]` tensors;
//! the actor's loss is taken on each rank's own tokens, and the gradients summed over
//! the group (`mmsp::all_reduce_grads`) are the one-device gradients.

use std::sync::Arc;

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use longview_comm::{Communicator, ReduceOp};
use longview_models::Vlm;
use longview_models::attention::AttentionImpl;
use longview_parallel::autodiff::{DistributedAttention, WithComm};
use longview_parallel::layout::{SeqLayout, shard};
use longview_parallel::model::install;
use longview_parallel::ring::{RingAttention, RingBalance};

use super::logprobs::ResponseLogprobs;
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
        let all: Vec<usize> = (0..comm.world_size()).collect();
        let ring_comm = comm.split(&[all]).map_err(comm_error("ring channels"))?;
        let scale = (head_dim as f64).powf(-0.5);
        let ring = Arc::new(WithComm {
            comm: ring_comm,
            attention: RingAttention {
                balance: RingBalance::Zigzag,
                causal: true,
                scale,
            },
        });
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
        prompt: &[u32],
        visual: Option<&Tensor<3>>,
        responses: &[Vec<u32>],
        temperature: f64,
        device: &Device,
    ) -> Result<Option<ResponseLogprobs>, TrainError> {
        let (world, rank) = (self.comm.world_size(), self.comm.rank());
        let n = responses.len();
        let longest = responses.iter().map(Vec::len).max().unwrap_or(0);
        if longest == 0 || prompt.is_empty() {
            return Ok(None);
        }
        // Zigzag needs a multiple of 2P rows; padding goes after every response, where
        // causal attention keeps it from the rows that matter.
        let len = (prompt.len() + longest).div_ceil(2 * world) * 2 * world;
        let filler = i64::from(model.placeholder_token_id == 0);
        let (mut ids, mut splice_ids) = (Vec::with_capacity(n * len), Vec::with_capacity(n * len));
        for response in responses {
            ids.extend(prompt.iter().map(|&t| t as i64));
            ids.extend(response.iter().map(|&t| t as i64));
            ids.extend(std::iter::repeat_n(0, len - prompt.len() - response.len()));
            splice_ids.extend(prompt.iter().map(|&t| t as i64));
            splice_ids.extend(std::iter::repeat_n(filler, len - prompt.len()));
        }
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [n, len]), device);
        let splice_ids = Tensor::<2, Int>::from_data(TensorData::new(splice_ids, [n, len]), device);
        let visual = visual.map(|v| Tensor::cat(vec![v.clone(); n], 0));
        let embeds = model.splice(model.embed_tokens(ids), &splice_ids, visual)?;

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
        let first = prompt.len() - 1;
        let picked: Vec<(usize, usize)> = positions
            .iter()
            .enumerate()
            .filter(|&(_, &p)| p >= first && p < first + longest)
            .map(|(row, &p)| (row, p - first))
            .collect();
        let m = picked.len();
        let zeros = Tensor::<2>::zeros([n, longest], device);
        if m == 0 {
            return Ok(Some(ResponseLogprobs {
                logp: zeros.clone() + x.sum().mul_scalar(0.0).reshape([1, 1]),
                mask: zeros.clone(),
                entropy: zeros,
            }));
        }
        let index: Vec<i64> = picked.iter().map(|&(row, _)| row as i64).collect();
        let index = Tensor::<1, Int>::from_data(TensorData::new(index, [m]), device);
        let logits = model.logits(x.select(1, index)).div_scalar(temperature);
        let all = log_softmax(logits, 2);
        let mut targets = Vec::with_capacity(n * m);
        let mut mask = Vec::with_capacity(n * m);
        for response in responses {
            for &(_, k) in &picked {
                targets.push(response.get(k).map_or(0, |&t| t as i64));
                mask.push(if k < response.len() { 1.0f32 } else { 0.0 });
            }
        }
        let targets = Tensor::<2, Int>::from_data(TensorData::new(targets, [n, m]), device);
        let mask = Tensor::<2>::from_data(TensorData::new(mask, [n, m]), device);
        let logp = all
            .clone()
            .gather(2, targets.unsqueeze_dim::<3>(2))
            .reshape([n, m])
            * mask.clone();
        let entropy = {
            let p = all.detach();
            (p.clone().exp() * p).sum_dim(2).neg().reshape([n, m]) * mask.clone()
        };
        // Place column j at response position picked[j].1: a [m, longest] 0/1 matrix.
        let mut place = vec![0f32; m * longest];
        for (j, &(_, k)) in picked.iter().enumerate() {
            place[j * longest + k] = 1.0;
        }
        let place = Tensor::<2>::from_data(TensorData::new(place, [m, longest]), device);
        Ok(Some(ResponseLogprobs {
            logp: logp.matmul(place.clone()),
            mask: mask.matmul(place.clone()),
            entropy: entropy.matmul(place),
        }))
    }

    /// The whole `[responses, max_len]` log-probs (untracked), the same on every rank:
    /// this rank's part summed with the others'.
    pub fn whole(
        &self,
        model: &Vlm,
        prompt: &[u32],
        visual: Option<&Tensor<3>>,
        responses: &[Vec<u32>],
        temperature: f64,
        device: &Device,
    ) -> Result<Option<Tensor<2>>, TrainError> {
        let Some(part) = self.local(model, prompt, visual, responses, temperature, device)? else {
            return Ok(None);
        };
        let total = self
            .comm
            .all_reduce(part.logp.detach().inner(), ReduceOp::Sum)
            .map_err(comm_error("summing log-probs"))?;
        Ok(Some(total))
    }
}
