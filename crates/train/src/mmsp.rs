//! Multi-Modal Sequence Parallelism (LongVILA's MM-SP) combined with data parallelism,
//! as a [`StepRunner`]: the world of `dp x sp` ranks is split into `dp` contiguous
//! sequence-parallel groups of `sp` ranks; every group takes its share of the global
//! batch's samples.
//!
//! Inside a group (docs/algorithms.md section 5):
//! 1. Vision stage: the batch's frames are split evenly over the `sp` ranks (zero frames
//!    pad the last share); each rank encodes only its frames, and the visual tokens
//!    are all-gathered.
//! 2. Language stage: labels are shifted on the whole sequence, then tokens,
//!    positions and labels are sharded zigzag (causal load balance); each rank splices
//!    the visual tokens of its own placeholder positions and runs the LLM on its shard
//!    with zigzag ring attention, or with [`MmSp::with_scheme`] Ulysses or LongVILA's
//!    2D attention (Ulysses inside groups of U ranks, zigzag ring across them, in the
//!    2D layout). The loss is divided by the global supervised count.
//! 3. Backward: the LLM's gradient for the gathered visual tokens is summed over the
//!    group and scattered back (reduce-scatter), and each rank back-propagates its own
//!    frames through the vision encoder and projector.
//!
//! Finally every gradient is summed over all ranks, so all ranks hold the same full
//! gradient and take the same optimizer step.
//!
//! The step itself is [`crate::remat::run_step`], the one executor over the model's
//! stages; this module supplies its hooks only ([`ShardHooks`]: the gather and
//! reduce-scatter after the vision stage, this rank's text shard, its splice and its
//! loss rows). With [`MmSp::with_recompute`] both stages run forward without autodiff
//! and keep per layer only what the mode names; LightSeq's attention-aware mode keeps
//! each ring attention's output and LSE, and the replay calls the ring's distributed
//! backward from them: neither the attention's compute nor its communication runs
//! twice. The model must call `AttentionImpl::Sharded` in its text layers when
//! `sp > 1` (the run's attention plan sets it, [`crate::plan`]).

use std::sync::Arc;

use burn::optim::{GradientsAccumulator, GradientsParams, ModuleOptimizer};
use burn::tensor::{Bool, DType, Device, Int, Tensor, TensorData};
use longview_comm::{Communicator, ReduceOp};
use longview_models::Vlm;
use longview_models::attention::AttentionImpl;
use longview_models::vila::{IGNORE_INDEX, SupervisedRows};
use longview_parallel::autodiff::{DistributedAttention, WithComm};
use longview_parallel::inference::{Heads, SpScheme, causal_scheme};
use longview_parallel::layout::{SeqLayout, shard, shift_labels};
use longview_parallel::model::install;
use longview_parallel::ring::{RingAttention, RingBalance};

use crate::data::{Sample, frames_tensor};
use crate::error::TrainError;
use crate::remat::{Recompute, StepHooks, StepInput, run_step};
use crate::trainer::StepRunner;
use crate::zero::{ShardId, sharded_step};

fn comm_error(what: &str) -> impl FnOnce(longview_comm::CommError) -> TrainError + '_ {
    move |e| TrainError::Parallel(format!("{what}: {e}"))
}

/// This rank's part of a `dp x sp` layout.
pub struct MmSp<C: Communicator> {
    world: C,
    /// The sequence-parallel group, for gathering visual tokens.
    group: C,
    /// The group's sequence-parallel attention (its own channels; zigzag ring unless
    /// [`MmSp::with_scheme`] says otherwise); `None` when `sp == 1`.
    attention: Option<Arc<dyn DistributedAttention>>,
    /// Which tokens a rank of the group holds under the scheme.
    layout: SeqLayout,
    scheme: SpScheme,
    pub dp: usize,
    pub sp: usize,
    pub dp_rank: usize,
    pub sp_rank: usize,
    scale: f64,
    recompute: Recompute,
    /// AdamW's moments sharded over the world (`run.shard_optimizer`).
    shard_optimizer: bool,
}

impl<C: Communicator + Send + Sync + 'static> MmSp<C> {
    /// Splits `world` into `world / sp` sequence-parallel groups of consecutive ranks;
    /// `head_dim` sets the attention scale.
    pub fn new(world: C, sp: usize, head_dim: usize) -> Result<Self, TrainError> {
        let size = world.world_size();
        if sp == 0 || !size.is_multiple_of(sp) {
            return Err(TrainError::Parallel(format!(
                "sequence-parallel degree {sp} must divide the {size} ranks"
            )));
        }
        let dp = size / sp;
        let groups: Vec<Vec<usize>> = (0..dp).map(|d| (d * sp..(d + 1) * sp).collect()).collect();
        let group = world
            .split(&groups)
            .map_err(comm_error("splitting SP groups"))?;
        let scale = (head_dim as f64).powf(-0.5);
        let attention: Option<Arc<dyn DistributedAttention>> = if sp > 1 {
            let ring = world
                .split(&groups)
                .map_err(comm_error("splitting ring groups"))?;
            Some(Arc::new(WithComm {
                comm: ring,
                attention: RingAttention {
                    balance: RingBalance::Zigzag,
                    causal: true,
                    scale,
                },
            }))
        } else {
            None
        };
        let rank = world.rank();
        Ok(MmSp {
            world,
            group,
            attention,
            dp,
            sp,
            dp_rank: rank / sp,
            sp_rank: rank % sp,
            layout: SeqLayout::Zigzag,
            scheme: SpScheme::ZigzagRing,
            scale,
            recompute: Recompute::None,
            shard_optimizer: false,
        })
    }

    /// The LLM's attention over each group on `scheme` (`run.sp_scheme`: zigzag ring,
    /// Ulysses or 2D) for a model of `heads`; a scheme the heads or the group size do
    /// not allow is refused with the rule. Nothing changes when `sp == 1`.
    pub fn with_scheme(mut self, heads: Heads, scheme: SpScheme) -> Result<Self, TrainError> {
        if self.sp == 1 || scheme == self.scheme {
            return Ok(self);
        }
        let (attention, layout, scale) =
            causal_scheme(&self.group, heads, scheme).map_err(|e| {
                TrainError::Parallel(format!(
                    "run.sp_scheme = \"{scheme}\" over {} ranks: {e}",
                    self.sp
                ))
            })?;
        self.attention = Some(attention);
        self.layout = layout;
        self.scheme = scheme;
        self.scale = scale;
        Ok(self)
    }

    /// Shards AdamW's moments over every rank of the world ([`crate::zero`]).
    pub fn with_sharded_optimizer(mut self, shard: bool) -> Self {
        self.shard_optimizer = shard;
        self
    }

    /// Recomputes activations in the backward (`Recompute::Layers` or LightSeq's
    /// `Recompute::AttentionAware`: the ring's kept output and LSE feed its distributed
    /// backward, so the ring forward never runs twice).
    pub fn with_recompute(mut self, recompute: Recompute) -> Self {
        self.recompute = recompute;
        self
    }

    /// This rank's share of the micro-batch's frames (`[share, 3, side, side]`; zero
    /// frames pad the last share), `None` for text-only batches (the whole SP group
    /// holds the same samples, so all of it skips the vision stage together). A share
    /// inside one sample is read from its buffer in place.
    fn local_pixels(
        &self,
        samples: &[&Sample],
        frames: usize,
        share: usize,
        device: &Device,
    ) -> Option<Tensor<4>> {
        (frames > 0).then(|| frames_tensor(samples, self.sp_rank * share, share, device))
    }

    /// Every rank's visual tokens, in frame order (`[frames, per_frame, hidden]`,
    /// untracked; with autodiff when `local` has it). They travel without autodiff
    /// (NCCL takes plain CUDA tensors) and stay on the device.
    fn gather_visual(&self, local: Tensor<3>, frames: usize) -> Result<Tensor<3>, TrainError> {
        let tracked = local.is_autodiff();
        let gathered = self
            .group
            .all_gather(local.inner(), 0)
            .map_err(comm_error("gathering visual tokens"))?
            .narrow(0, 0, frames);
        Ok(if tracked {
            gathered.autodiff()
        } else {
            gathered
        })
    }

    /// The gradient of this rank's own visual tokens: the group's gradients of the
    /// gathered tokens summed and scattered back to the frames' owners.
    fn scatter_visual_grad(
        &self,
        d_visual: Tensor<3>,
        share: usize,
        device: &Device,
    ) -> Result<Tensor<3>, TrainError> {
        let [frames, per_frame, hidden] = d_visual.dims();
        let d_all = if share * self.sp > frames {
            let pad = Tensor::zeros(
                [share * self.sp - frames, per_frame, hidden],
                (&d_visual.device(), d_visual.dtype()),
            );
            Tensor::cat(vec![d_visual, pad], 0)
        } else {
            d_visual
        };
        let d_mine = self
            .group
            .reduce_scatter(d_all, 0, ReduceOp::Sum)
            .map_err(comm_error("scattering visual-token gradients"))?;
        Ok(d_mine.to_device(device))
    }

    /// This rank's shard of the micro-batch's token stream: labels shifted on the whole
    /// sequences, then tokens, positions and targets sharded (zigzag when `sp > 1`),
    /// and where each placeholder's visual token comes from.
    fn text_shard(
        &self,
        model: &Vlm,
        samples: &[&Sample],
        device: &Device,
    ) -> Result<TextShard, TrainError> {
        let (sp, rank) = (self.sp, self.sp_rank);
        let b = samples.len();
        let len = samples.iter().map(|s| s.ids.len()).max().unwrap_or(0);
        let padded = len.div_ceil(2 * sp) * 2 * sp;
        let placeholder = model.placeholder_token_id;
        let mut ids = vec![0i64; b * padded];
        let mut labels = vec![IGNORE_INDEX; b * padded];
        let mut ordinal = vec![usize::MAX; b * padded];
        let mut next = 0;
        for (row, s) in samples.iter().enumerate() {
            for (t, (&id, &label)) in s.ids.iter().zip(&s.labels).enumerate() {
                ids[row * padded + t] = id as i64;
                if id == placeholder {
                    ordinal[row * padded + t] = next;
                    next += 1;
                } else {
                    labels[row * padded + t] = label;
                }
            }
        }
        let layout = if sp > 1 {
            self.layout
        } else {
            SeqLayout::Contiguous
        };
        let positions = layout
            .positions(padded, rank, sp)
            .map_err(|e| TrainError::Parallel(e.to_string()))?;
        let n = positions.len();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [b, padded]), device);
        let targets = shift_labels(Tensor::<2, Int>::from_data(
            TensorData::new(labels, [b, padded]),
            device,
        ));
        let sharded = |x: Tensor<2, Int>| {
            shard(x, 1, layout, rank, sp).map_err(|e| TrainError::Parallel(e.to_string()))
        };
        let mut index = Vec::with_capacity(b * n);
        let mut mask = Vec::with_capacity(b * n);
        for row in 0..b {
            for &p in &positions {
                let o = ordinal[row * padded + p];
                mask.push(o != usize::MAX);
                index.push(if o == usize::MAX { 0 } else { o as i64 });
            }
        }
        let position_ids = Tensor::<2, Int>::from_data(
            TensorData::new(
                (0..b)
                    .flat_map(|_| positions.iter().map(|&p| p as i64))
                    .collect(),
                [b, n],
            ),
            device,
        );
        Ok(TextShard {
            ids: sharded(ids)?,
            targets: sharded(targets)?,
            position_ids,
            index,
            mask,
            placeholders: next,
        })
    }

    /// Loss share and gradients of this rank's part of one DP group's micro-batch.
    fn micro_step(
        &self,
        model: &Vlm,
        samples: &[&Sample],
        supervised: usize,
        device: &Device,
    ) -> Result<(f32, GradientsParams), TrainError> {
        if self.sp > 1 && model.text_attention() != AttentionImpl::Sharded {
            return Err(TrainError::Parallel(format!(
                "MM-SP over {} ranks needs the model's text layers on AttentionImpl::Sharded \
                 (the run's attention plan sets it), but they call {:?}",
                self.sp,
                model.text_attention()
            )));
        }
        let frames: usize = samples.iter().map(|s| s.frames).sum();
        // Every rank encodes whole groups of the projector's temporal pooling (the
        // samples' frames are padded to whole groups, `longview_infer::sample`), so
        // no group straddles two ranks or two samples.
        let pool = model.temporal_pool();
        if let Some(s) = samples.iter().find(|s| s.frames % pool != 0) {
            return Err(TrainError::Parallel(format!(
                "a sample of {} frames under temporal pooling of {pool}: samples must hold \
                 whole groups of frames (build them with longview_infer::sample::Encoder)",
                s.frames
            )));
        }
        let share = frames.div_ceil(self.sp * pool).max(1) * pool;
        let pixels = self.local_pixels(samples, frames, share, device);
        let text = self.text_shard(model, samples, device)?;
        let input = StepInput {
            pixels,
            given_visual: None,
            ids: text.ids.clone(),
            position_ids: text.position_ids.clone(),
        };
        let hooks = ShardHooks {
            mmsp: self,
            text,
            frames: frames / pool,
            share: share / pool,
        };
        let _installed = self.attention.as_ref().map(|attention| {
            let what = format!("MM-SP {} attention", self.scheme);
            install(attention.clone(), true, self.scale, what)
        });
        run_step(
            model,
            input,
            &hooks,
            supervised.max(1) as f32,
            self.recompute,
        )
    }
}

/// [`run_step`]'s hooks on one rank of an MM-SP group.
struct ShardHooks<'a, C: Communicator> {
    mmsp: &'a MmSp<C>,
    text: TextShard,
    /// Frames' worth of visual tokens of the micro-batch (one per pooled group of
    /// frames), and how many each rank's share of the frames gives.
    frames: usize,
    share: usize,
}

impl<C: Communicator + Send + Sync + 'static> StepHooks for ShardHooks<'_, C> {
    fn gather_visual(&self, local: Tensor<3>) -> Result<Tensor<3>, TrainError> {
        self.mmsp.gather_visual(local, self.frames)
    }

    fn scatter_visual_grad(&self, grad: Tensor<3>) -> Result<Tensor<3>, TrainError> {
        let device = grad.device();
        self.mmsp.scatter_visual_grad(grad, self.share, &device)
    }

    fn splice(
        &self,
        _model: &Vlm,
        text: Tensor<3>,
        visual: Option<Tensor<3>>,
    ) -> Result<Tensor<3>, TrainError> {
        self.text.splice(text, visual)
    }

    fn supervised_rows(&self) -> Result<SupervisedRows, TrainError> {
        // Targets already shifted (what each shard position predicts), read on the
        // host: their device does not matter.
        Ok(SupervisedRows::of(&self.text.targets, 0)?)
    }
}

/// One rank's shard of a micro-batch's token stream.
struct TextShard {
    /// `[batch, local_len]` token ids, targets (already shifted: what each position
    /// predicts) and global positions, on the step's device.
    ids: Tensor<2, Int>,
    targets: Tensor<2, Int>,
    position_ids: Tensor<2, Int>,
    /// Per shard position (row-major), the ordinal of its visual token among the
    /// micro-batch's gathered ones, and whether it is a placeholder at all.
    index: Vec<i64>,
    mask: Vec<bool>,
    /// Visual placeholders in the whole micro-batch (all shards).
    placeholders: usize,
}

impl TextShard {
    /// `text` with the placeholder rows taken from `visual` (`[frames, per_frame,
    /// hidden]`, on `text`'s device).
    fn splice(&self, text: Tensor<3>, visual: Option<Tensor<3>>) -> Result<Tensor<3>, TrainError> {
        let rows = visual.as_ref().map_or(0, |v| v.dims()[0] * v.dims()[1]);
        if rows != self.placeholders {
            return Err(TrainError::Parallel(format!(
                "{} visual placeholders in the micro-batch but the frames give {rows} visual tokens",
                self.placeholders
            )));
        }
        let Some(visual) = visual else {
            return Ok(text);
        };
        let [b, n, hidden] = text.dims();
        let device = text.device();
        let [frames, per_frame, _] = visual.dims();
        let visual = visual.reshape([frames * per_frame, hidden]);
        let index =
            Tensor::<1, Int>::from_data(TensorData::new(self.index.clone(), [b * n]), &device);
        let rows = visual.select(0, index).reshape([b, n, hidden]);
        let mask =
            Tensor::<2, Bool>::from_data(TensorData::new(self.mask.clone(), [b, n]), &device)
                .unsqueeze_dim::<3>(2)
                .expand([b, n, hidden]);
        Ok(text.mask_where(mask, rows))
    }
}

pub use crate::grad_sync::{all_reduce_grads, broadcast_params};

impl<C: Communicator + Send + Sync + 'static> StepRunner for MmSp<C> {
    fn step(
        &self,
        model: &Vlm,
        micro: &[Vec<&Sample>],
        supervised: usize,
        device: &Device,
    ) -> Result<(f32, GradientsParams), TrainError> {
        let mut accumulator = GradientsAccumulator::<Vlm>::new();
        let mut loss = 0.0f32;
        for samples in micro {
            if !samples.len().is_multiple_of(self.dp) {
                return Err(TrainError::Parallel(format!(
                    "a micro-batch of {} samples cannot be split over {} data-parallel groups",
                    samples.len(),
                    self.dp
                )));
            }
            let per = samples.len() / self.dp;
            let mine = &samples[self.dp_rank * per..(self.dp_rank + 1) * per];
            let (value, grads) = self.micro_step(model, mine, supervised, device)?;
            loss += value;
            accumulator.accumulate(model, grads);
        }
        let grads = all_reduce_grads(model, accumulator.grads(), &self.world)?;
        let total = self
            .world
            .all_reduce(
                // In f32: on a bf16 device the default dtype would round the loss.
                Tensor::<1>::from_data(
                    TensorData::new(vec![loss], [1]),
                    (&device.clone().inner(), DType::F32),
                ),
                ReduceOp::Sum,
            )
            .map_err(comm_error("loss all-reduce"))?;
        Ok((total.into_scalar::<f32>(), grads))
    }

    fn writes(&self) -> bool {
        self.world.rank() == 0
    }

    fn sync_model(&self, model: Vlm) -> Result<Vlm, TrainError> {
        broadcast_params(model, &self.world)
    }

    fn sequence_parallel(&self, device: &Device) -> Option<String> {
        (self.sp > 1).then(|| {
            let scheme = match self.scheme {
                SpScheme::ZigzagRing => "zigzag ring".to_string(),
                SpScheme::Ulysses => "Ulysses".to_string(),
                SpScheme::TwoD { ulysses } => format!(
                    "2D attention (Ulysses {ulysses} x zigzag ring {})",
                    self.sp / ulysses
                ),
            };
            format!(
                "{scheme} over {} ranks (blocks: {})",
                self.sp,
                longview_parallel::block::block_kernel(device)
            )
        })
    }

    fn barrier(&self, device: &Device) -> Result<(), TrainError> {
        self.any_failed(false, device).map(|_| ())
    }

    fn optimizer_shard(&self) -> Option<ShardId> {
        self.shard_optimizer.then(|| ShardId {
            rank: self.world.rank(),
            world: self.world.world_size(),
        })
    }

    fn update(
        &self,
        optim: &mut ModuleOptimizer,
        lr: f64,
        model: Vlm,
        grads: GradientsParams,
    ) -> Result<Vlm, TrainError> {
        match self.shard_optimizer {
            true => sharded_step(optim, lr, model, grads, &self.world),
            false => Ok(optim.step(lr, model, grads)),
        }
    }

    fn any_failed(&self, failed: bool, device: &Device) -> Result<bool, TrainError> {
        // On the run's device: NCCL takes CUDA tensors only.
        let device = device.clone().inner();
        let flag = Tensor::<1>::from_data(
            TensorData::new(vec![f32::from(u8::from(failed))], [1]),
            &device,
        );
        let failures = self
            .world
            .all_reduce(flag, ReduceOp::Sum)
            .map_err(comm_error("barrier"))?;
        Ok(failures.into_scalar::<f32>() > 0.0)
    }
}
