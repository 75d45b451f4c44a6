//! Where GRPO's model passes run: [`OneDevice`], or a sequence-parallel group
//! ([`SpPasses`]: rollouts prefilled with zigzag ring attention and decoded against a
//! sharded KV cache, log-prob passes split zigzag over the ranks, gradients and
//! statistics summed over the group). Every rank of a group computes the same
//! rollouts, advantages and updates.

use burn::optim::GradientsParams;
use burn::tensor::{DType, Device, Tensor, TensorData};
use longview_comm::{Communicator, ReduceOp};
use longview_infer::batch::{BatchOptions, BatchRequest, BatchTimes, generate_batch_timed};
use longview_infer::generate::{Decoding, GenerateOptions, Generation, Limits};
use longview_models::{VisualInput, Vlm};
use longview_parallel::inference::{Heads, SpInference, SpScheme};

use super::actor::{ActorLoss, actor_grads_plain};
use super::logprobs::{ResponseLogprobs, Rollout};
use super::shared_prefix::{shared_prefix_grads_recomputed, shared_prefix_logprobs};
use super::sp_logprobs::SpLogprobs;
use crate::error::TrainError;
use crate::mmsp::all_reduce_grads;
use crate::remat::Recompute;

/// The model passes of a GRPO step.
pub trait Passes {
    /// A prompt's frames (`[frames, 3, side, side]`) to visual tokens (`[frames,
    /// tokens_per_frame, hidden]`), the same on every rank.
    fn encode(&self, policy: &Vlm, pixels: Tensor<4>) -> Result<Tensor<3>, TrainError>;

    /// The responses to every prompt of a step (`out[p][g]`: prompt `p`'s sample
    /// `g`), each prompt prefilled once for its samples, and the time of the prefill
    /// and of the decoding.
    fn generate(
        &self,
        policy: &Vlm,
        prompts: Vec<PromptSamples>,
        options: &GenerateOptions,
        device: &Device,
    ) -> Result<(Vec<Vec<Generation>>, BatchTimes), TrainError>;

    /// The responses' whole `[responses, max_len]` log-probs, untracked (old policy,
    /// reference); the same on every rank.
    fn whole_logprobs(
        &self,
        model: &Vlm,
        rollout: &Rollout<'_>,
        device: &Device,
    ) -> Result<Option<Tensor<2>>, TrainError>;

    /// The actor's log-probs of this rank's response tokens (tracked).
    fn actor_logprobs(
        &self,
        model: &Vlm,
        rollout: &Rollout<'_>,
        device: &Device,
    ) -> Result<Option<ResponseLogprobs>, TrainError>;

    /// The actor's loss of a group (`loss_of` maps the tracked log-probs of this
    /// rank's response tokens to the loss and its statistics) and this rank's
    /// gradients of it; `None` when every response is empty. One autodiff graph over
    /// [`Passes::actor_logprobs`], or with [`Passes::recompute`] the text layers
    /// recomputed in the backward ([`Passes::recomputed_actor_grads`]).
    fn actor_grads(
        &self,
        model: &Vlm,
        rollout: &Rollout<'_>,
        device: &Device,
        loss_of: ActorLoss<'_>,
    ) -> Result<Option<(Vec<f32>, GradientsParams)>, TrainError> {
        match self.recompute() {
            Recompute::None => {
                actor_grads_plain(model, self.actor_logprobs(model, rollout, device)?, loss_of)
            }
            mode => self.recomputed_actor_grads(model, rollout, mode, device, loss_of),
        }
    }

    /// How the actor's pass recomputes its text layers (`run.recompute`).
    fn recompute(&self) -> Recompute;

    /// [`Passes::actor_grads`] with the text layers recomputed in the backward
    /// (`mode`: `Layers` or `AttentionAware`).
    fn recomputed_actor_grads(
        &self,
        model: &Vlm,
        rollout: &Rollout<'_>,
        mode: Recompute,
        device: &Device,
        loss_of: ActorLoss<'_>,
    ) -> Result<Option<(Vec<f32>, GradientsParams)>, TrainError>;

    /// Gradients summed over the ranks that share the sequences.
    fn reduce_grads(
        &self,
        model: &Vlm,
        grads: GradientsParams,
    ) -> Result<GradientsParams, TrainError>;

    /// Statistics summed over those ranks (exchanged as a tensor on `device`).
    fn sum(&self, values: Vec<f32>, device: &Device) -> Result<Vec<f32>, TrainError>;
}

/// One prompt of a rollout batch and its samples' decodings.
pub struct PromptSamples {
    pub prompt: Vec<u32>,
    pub visual: VisualInput,
    pub samples: Vec<Decoding>,
}

/// The step's prompts as batch requests, every prompt with the options' limits.
fn batch_requests(prompts: Vec<PromptSamples>, options: &GenerateOptions) -> Vec<BatchRequest> {
    let limits = Limits {
        max_new_tokens: options.max_new_tokens,
        stop: options.stop.clone(),
    };
    prompts
        .into_iter()
        .map(|p| BatchRequest {
            prompt: p.prompt,
            visual: p.visual,
            samples: p.samples,
            limits: limits.clone(),
        })
        .collect()
}

/// Everything on one device, every log-prob pass with the group's prompt run once
/// ([`super::shared_prefix`]); the actor's pass recomputes its text layers in the
/// backward unless `recompute` is `None` (`run.recompute`).
#[derive(Debug, Clone, Copy, Default)]
pub struct OneDevice {
    pub recompute: Recompute,
}

impl Passes for OneDevice {
    fn encode(&self, policy: &Vlm, pixels: Tensor<4>) -> Result<Tensor<3>, TrainError> {
        Ok(policy.encode_frames(pixels))
    }

    /// All prompts' samples decode as one batch (`longview_infer::batch`).
    fn generate(
        &self,
        policy: &Vlm,
        prompts: Vec<PromptSamples>,
        options: &GenerateOptions,
        device: &Device,
    ) -> Result<(Vec<Vec<Generation>>, BatchTimes), TrainError> {
        let requests = batch_requests(prompts, options);
        let batch = BatchOptions {
            prefill_chunk: options.prefill_chunk,
            memory_budget: options.memory_budget,
        };
        Ok(generate_batch_timed(policy, requests, &batch, device)?)
    }

    fn whole_logprobs(
        &self,
        model: &Vlm,
        rollout: &Rollout<'_>,
        device: &Device,
    ) -> Result<Option<Tensor<2>>, TrainError> {
        Ok(shared_prefix_logprobs(model, rollout, device)?.map(|l| l.logp))
    }

    fn actor_logprobs(
        &self,
        model: &Vlm,
        rollout: &Rollout<'_>,
        device: &Device,
    ) -> Result<Option<ResponseLogprobs>, TrainError> {
        shared_prefix_logprobs(model, rollout, device)
    }

    fn recompute(&self) -> Recompute {
        self.recompute
    }

    fn recomputed_actor_grads(
        &self,
        model: &Vlm,
        rollout: &Rollout<'_>,
        mode: Recompute,
        device: &Device,
        loss_of: ActorLoss<'_>,
    ) -> Result<Option<(Vec<f32>, GradientsParams)>, TrainError> {
        shared_prefix_grads_recomputed(model, rollout, mode, device, loss_of)
    }

    fn reduce_grads(&self, _: &Vlm, grads: GradientsParams) -> Result<GradientsParams, TrainError> {
        Ok(grads)
    }

    fn sum(&self, values: Vec<f32>, _: &Device) -> Result<Vec<f32>, TrainError> {
        Ok(values)
    }
}

/// A rank of a sequence-parallel group: rollouts through [`SpInference`], log-probs
/// through [`SpLogprobs`] (each on its own channels of the group); the actor's pass
/// recomputes its text layers in the backward unless `recompute` is `None`.
pub struct SpPasses<C: Communicator + Send + Sync + 'static> {
    pub inference: SpInference<C>,
    pub logprobs: SpLogprobs<C>,
    pub recompute: Recompute,
}

impl<C: Communicator + Send + Sync + 'static> SpPasses<C> {
    /// Splits `comm` into the channels of both halves.
    pub fn new(comm: &C, head_dim: usize) -> Result<Self, TrainError> {
        let all: Vec<usize> = (0..comm.world_size()).collect();
        let split = |what: &str| {
            comm.split(std::slice::from_ref(&all))
                .map_err(|e| TrainError::Parallel(format!("GRPO {what} channels: {e}")))
        };
        Ok(SpPasses {
            inference: SpInference::new(split("rollout")?, head_dim)?,
            logprobs: SpLogprobs::new(split("log-prob")?, head_dim)?,
            recompute: Recompute::None,
        })
    }

    /// [`Self::new`] with the prefill and the log-prob passes on `scheme` (ring,
    /// Ulysses or 2D) for a model of `heads`.
    pub fn with_scheme(comm: &C, heads: Heads, scheme: SpScheme) -> Result<Self, TrainError> {
        let all: Vec<usize> = (0..comm.world_size()).collect();
        let split = |what: &str| {
            comm.split(std::slice::from_ref(&all))
                .map_err(|e| TrainError::Parallel(format!("GRPO {what} channels: {e}")))
        };
        Ok(SpPasses {
            inference: SpInference::with_scheme(
                split("rollout")?,
                heads.head_dim,
                heads.q_heads,
                heads.kv_heads,
                scheme,
            )?,
            logprobs: SpLogprobs::with_scheme(split("log-prob")?, heads, scheme)?,
            recompute: Recompute::None,
        })
    }

    /// The actor's pass with its text layers recomputed in the backward
    /// (`run.recompute`).
    pub fn with_recompute(mut self, recompute: Recompute) -> Self {
        self.recompute = recompute;
        self
    }
}

impl<C: Communicator + Send + Sync + 'static> Passes for SpPasses<C> {
    /// MR-SP's first stage ([`encode_frames_sharded`]).
    fn encode(&self, policy: &Vlm, pixels: Tensor<4>) -> Result<Tensor<3>, TrainError> {
        encode_frames_sharded(policy, pixels, self.logprobs.comm())
    }

    /// Every prompt prefilled sequence-parallel, then all prompts' samples decoded
    /// as one batch against the sharded caches (`SpInference::generate_batch`).
    fn generate(
        &self,
        policy: &Vlm,
        prompts: Vec<PromptSamples>,
        options: &GenerateOptions,
        device: &Device,
    ) -> Result<(Vec<Vec<Generation>>, BatchTimes), TrainError> {
        Ok(self
            .inference
            .generate_batch_timed(policy, batch_requests(prompts, options), device)?)
    }

    fn whole_logprobs(
        &self,
        model: &Vlm,
        rollout: &Rollout<'_>,
        device: &Device,
    ) -> Result<Option<Tensor<2>>, TrainError> {
        self.logprobs.whole(model, rollout, device)
    }

    fn actor_logprobs(
        &self,
        model: &Vlm,
        rollout: &Rollout<'_>,
        device: &Device,
    ) -> Result<Option<ResponseLogprobs>, TrainError> {
        self.logprobs.local(model, rollout, device)
    }

    fn recompute(&self) -> Recompute {
        self.recompute
    }

    fn recomputed_actor_grads(
        &self,
        model: &Vlm,
        rollout: &Rollout<'_>,
        mode: Recompute,
        device: &Device,
        loss_of: ActorLoss<'_>,
    ) -> Result<Option<(Vec<f32>, GradientsParams)>, TrainError> {
        self.logprobs
            .actor_grads(model, rollout, mode, device, loss_of)
    }

    fn reduce_grads(
        &self,
        model: &Vlm,
        grads: GradientsParams,
    ) -> Result<GradientsParams, TrainError> {
        all_reduce_grads(model, grads, self.logprobs.comm())
    }

    fn sum(&self, values: Vec<f32>, device: &Device) -> Result<Vec<f32>, TrainError> {
        let n = values.len();
        // In f32: on a bf16 device the default dtype would round the statistics.
        let local = Tensor::<1>::from_data(TensorData::new(values, [n]), (device, DType::F32));
        let total = self
            .logprobs
            .comm()
            .all_reduce(local, ReduceOp::Sum)
            .map_err(|e| TrainError::Parallel(format!("summing GRPO statistics: {e}")))?;
        total
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .map_err(|e| TrainError::Parallel(format!("reading GRPO statistics: {e:?}")))
    }
}

/// MR-SP's first stage: each rank of `comm` encodes a contiguous share of the frames
/// (`[frames, 3, side, side]`; whole groups of the projector's temporal pooling, the
/// last share padded with zero frames), and the visual tokens are gathered in order:
/// `[frames / pool, tokens_per_frame, hidden]`, the same on every rank.
pub fn encode_frames_sharded<C: Communicator>(
    policy: &Vlm,
    pixels: Tensor<4>,
    comm: &C,
) -> Result<Tensor<3>, TrainError> {
    let pool = policy.temporal_pool();
    // The video's last group filled with copies of its last frame, as the projector
    // fills it on one device.
    let [frames, c, h, w] = pixels.dims();
    let missing = frames.div_ceil(pool) * pool - frames;
    let pixels = match missing {
        0 => pixels,
        m => {
            let last = pixels.clone().narrow(0, frames - 1, 1).expand([m, c, h, w]);
            Tensor::cat(vec![pixels, last], 0)
        }
    };
    let frames = frames + missing;
    let share = frames.div_ceil(comm.world_size() * pool) * pool;
    let start = (comm.rank() * share).min(frames);
    let mine = share.min(frames - start);
    let device = pixels.device();
    let pad = |n: usize| Tensor::<4>::zeros([n, c, h, w], &device);
    let local = match mine {
        // More ranks than frames: this rank encodes padding only.
        0 => pad(share),
        m if m < share => Tensor::cat(vec![pixels.narrow(0, start, m), pad(share - m)], 0),
        m => pixels.narrow(0, start, m),
    };
    let gathered = comm
        .all_gather(policy.encode_frames(local), 0)
        .map_err(|e| TrainError::Parallel(format!("gathering visual tokens: {e}")))?;
    Ok(gathered.narrow(0, 0, frames / pool))
}
