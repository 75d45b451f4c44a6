//! The training loop: micro-batches summed into one step with the loss normalised by
//! the step's supervised-token count, global-norm clipping, AdamW under a warmup +
//! cosine schedule, metrics and progress ([`crate::sinks`]), and atomic checkpoints
//! that `resume` continues bit for bit. Run preparation (fresh or resumed model, the
//! attention plan, data) is [`crate::prepare`]; gradient helpers are [`crate::grads`].

use std::path::PathBuf;
use std::time::Instant;

use burn::optim::{GradientsAccumulator, GradientsParams, ModuleOptimizer};
use burn::tensor::{DType, Device};
use longview_models::Vlm;
use longview_models::vila::train_flops;

use crate::config::TrainConfig;
use crate::data::{Encoder, Sample, collate};
use crate::data_feed::{SampleStream, load_data, prefetch};
use crate::error::TrainError;
use crate::needle::NeedleReport;
use crate::phases::{PhaseClock, StepPhases};
use crate::plan::AttentionPlan;
use crate::prepare::{Prepared, prepare};
use crate::remat::{Recompute, loss_and_grads};
use crate::run_loop::RunLoop;
use crate::zero::ShardId;

pub use crate::grads::{
    NO_DECAY, cast_grads, cast_params, global_grad_norm, learning_rate, optimizer, scale_grads,
};
pub use crate::prepare::{init_dir, model_config, tokenizer};

/// How a run is started.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Continue from the newest checkpoint in `run.out` (error if there is none).
    pub resume: bool,
    /// Continue from this checkpoint folder instead of the newest (implies `resume`).
    pub resume_from: Option<PathBuf>,
    /// Resume even when the config differs from the checkpoint's in keys that change
    /// the run (the differences are logged).
    pub allow_config_change: bool,
    /// Stop after this many steps of this invocation (the schedule still spans
    /// `run.steps`); used to test interruption and resume.
    pub stop_after: Option<usize>,
    /// Draw a progress bar on stderr.
    pub progress: bool,
    /// The device's dense matmul rate in TFLOP/s (measured by the caller on a GPU):
    /// with it, every step reports its model FLOPs utilisation (MFU).
    pub matmul_tflops: Option<f64>,
    /// Bytes the run's model states may take beyond the loaded weights; `None`: what
    /// the device has available at the start ([`crate::states_memory`]).
    pub memory_budget: Option<f64>,
    /// Time each step's parts (master-weight cast, forward+backward, gradient cast,
    /// clipping, update) between device synchronisations: printed with each step and
    /// written to its `metrics.jsonl` row as `phases` ([`crate::phases`]).
    pub phase_timings: bool,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            resume: false,
            resume_from: None,
            allow_config_change: false,
            stop_after: None,
            progress: true,
            matmul_tflops: None,
            memory_budget: None,
            phase_timings: false,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// Mean loss of every step since the run began (resumed steps included).
    pub losses: Vec<f32>,
    pub first_step: usize,
    pub last_step: usize,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
    pub checkpoint: Option<PathBuf>,
    /// Held-out needle accuracy after the last step (when the data has a held-out set).
    pub eval: Option<NeedleReport>,
    /// What the training samples were drawn from.
    pub data: String,
    /// Model TFLOP/s over this invocation's steps (wall time, data loading included).
    pub model_tflops: f64,
    pub params: usize,
    pub trainable_params: usize,
    /// The most device memory the allocator held after a step (MiB), where the
    /// backend reports it.
    pub peak_device_mib: Option<f64>,
    /// The attention every part of the model ran with.
    pub attention: AttentionPlan,
    /// The rates of this invocation's steps after its first, which also compiles the
    /// kernels and tunes the GEMMs for new shapes (`None` with fewer than 2 steps).
    pub steady: Option<SteadyRate>,
}

/// Step time and throughput of a run's steps after its first.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SteadyRate {
    /// Steps counted.
    pub steps: usize,
    /// Their median time, seconds.
    pub median_step_s: f64,
    /// Their tokens over their summed time.
    pub tokens_per_s: f64,
    /// Their model FLOP over their summed time, TFLOP/s.
    pub model_tflops: f64,
}

impl SteadyRate {
    /// From every step's (seconds, model FLOP, tokens), the first left out.
    pub fn after_first(steps: &[(f64, f64, u64)]) -> Option<SteadyRate> {
        let rest = steps.get(1..).filter(|r| !r.is_empty())?;
        let mut times: Vec<f64> = rest.iter().map(|s| s.0).collect();
        times.sort_by(f64::total_cmp);
        let n = times.len();
        let median_step_s = if n % 2 == 1 {
            times[n / 2]
        } else {
            (times[n / 2 - 1] + times[n / 2]) / 2.0
        };
        let seconds: f64 = rest.iter().map(|s| s.0).sum::<f64>().max(1e-9);
        Some(SteadyRate {
            steps: n,
            median_step_s,
            tokens_per_s: rest.iter().map(|s| s.2 as f64).sum::<f64>() / seconds,
            model_tflops: rest.iter().map(|s| s.1).sum::<f64>() / seconds / 1e12,
        })
    }
}

/// Computes one optimizer step: the global mean loss and this rank's gradients of it
/// (complete, i.e. already summed over ranks where the work is split).
pub trait StepRunner {
    /// `micro`: the step's micro-batches (the global batch, the same on every rank);
    /// `supervised`: the step's global supervised-token count.
    fn step(
        &self,
        model: &Vlm,
        micro: &[Vec<&Sample>],
        supervised: usize,
        device: &Device,
    ) -> Result<(f32, GradientsParams), TrainError>;

    /// Whether this rank writes checkpoints, metrics, event files and the progress bar.
    fn writes(&self) -> bool {
        true
    }

    /// Makes every rank start from the same weights.
    fn sync_model(&self, model: Vlm) -> Result<Vlm, TrainError> {
        Ok(model)
    }

    /// Waits until every rank has called it (the writer prepares shared files first).
    fn barrier(&self, _device: &Device) -> Result<(), TrainError> {
        Ok(())
    }

    /// The sequence-parallel scheme this layout runs the LLM's attention with (its
    /// name, group size and block kernels, for the attention plan), or `None` when
    /// every rank holds whole sequences.
    fn sequence_parallel(&self, _device: &Device) -> Option<String> {
        None
    }

    /// This rank's shard of the optimizer state (`run.shard_optimizer`, see
    /// [`crate::zero`]), or `None` when every rank keeps all of it.
    fn optimizer_shard(&self) -> Option<ShardId> {
        None
    }

    /// One optimizer step of `model` (the f32 master weights under mixed precision)
    /// with the step's summed `grads`: the whole optimizer here, or this rank's shard
    /// followed by the owners' broadcast.
    fn update(
        &self,
        optim: &mut ModuleOptimizer,
        lr: f64,
        model: Vlm,
        grads: GradientsParams,
    ) -> Result<Vlm, TrainError> {
        Ok(optim.step(lr, model, grads))
    }

    /// Whether any rank failed, given whether this one did (every rank learns it).
    fn any_failed(&self, failed: bool, _device: &Device) -> Result<bool, TrainError> {
        Ok(failed)
    }
}

/// Everything on one device: micro-batches summed, each normalised by the step's
/// supervised-token count; with `recompute`, through [`crate::remat`].
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleDevice {
    pub recompute: Recompute,
}

impl StepRunner for SingleDevice {
    fn step(
        &self,
        model: &Vlm,
        micro: &[Vec<&Sample>],
        supervised: usize,
        device: &Device,
    ) -> Result<(f32, GradientsParams), TrainError> {
        let mut accumulator = GradientsAccumulator::<Vlm>::new();
        let mut loss_value = 0.0f32;
        for samples in micro {
            let batch = collate(samples, device);
            let (loss, grads) = loss_and_grads(
                model,
                batch.input,
                batch.labels,
                supervised.max(1) as f32,
                self.recompute,
            )?;
            loss_value += loss;
            accumulator.accumulate(model, grads);
        }
        Ok((loss_value, accumulator.grads()))
    }
}

/// Runs (or resumes) a training run on one device; `log` receives human-readable lines.
pub fn train(
    config: &TrainConfig,
    options: &TrainOptions,
    device: &Device,
    log: &mut dyn FnMut(&str),
) -> Result<TrainSummary, TrainError> {
    let runner = SingleDevice {
        recompute: config.run.recompute,
    };
    train_with(config, options, device, log, &runner)
}

/// Runs (or resumes) a training run with `runner` computing the steps (one device, or
/// this rank's part of a parallel layout).
pub fn train_with(
    config: &TrainConfig,
    options: &TrainOptions,
    device: &Device,
    log: &mut dyn FnMut(&str),
    runner: &dyn StepRunner,
) -> Result<TrainSummary, TrainError> {
    let mut run = prepare(config, options, device, log, runner)?;
    let (samples, eval, data) = start_data(&run, config, options, runner, device, log)?;
    let mut book = RunLoop::open(&run, config, options, runner, device, eval)?;
    for step in book.steps() {
        let drawn = samples
            .recv()
            .map_err(|_| TrainError::Request("the data worker stopped".into()))??;
        book.skipped(&run, step, &drawn.skipped, log)?;
        let step_timer = Instant::now();
        let mut clock = PhaseClock::new(device, options.phase_timings);
        let (mut done, grads) = one_step(
            &run,
            config,
            runner,
            &drawn.samples,
            step,
            device,
            &mut clock,
        )?;
        if !done.loss.is_finite() {
            return Err(book.diverged(step, done.loss));
        }
        run.model = runner.update(&mut run.optim, done.lr, run.model, grads)?;
        if let Some(phases) = done.phases.as_mut() {
            phases.update_s = clock.lap()?;
        }
        book.record(&mut run, &done, step_timer.elapsed().as_secs_f64(), log)?;
    }
    book.finish(run, data)
}

/// Writes the run's config, loads its data and starts the worker that decodes the
/// samples of this invocation's steps: the sample stream, the held-out set and a
/// description of the data.
pub(crate) fn start_data(
    run: &Prepared,
    config: &TrainConfig,
    options: &TrainOptions,
    runner: &dyn StepRunner,
    device: &Device,
    log: &mut dyn FnMut(&str),
) -> Result<(SampleStream, Vec<Sample>, String), TrainError> {
    let out = &config.run.out;
    if runner.writes() {
        std::fs::write(out.join("config.toml"), config.to_toml())
            .map_err(TrainError::io(out.join("config.toml")))?;
    }
    let side = run.vlm_config.vision.image_size as u32;
    let encoder = Encoder {
        tokenizer: &run.tokenizer,
        template: longview_data::ChatTemplate::qwen2(),
        model: &run.vlm_config,
        width: config.data.width.unwrap_or(side),
        height: config.data.height.unwrap_or(side),
    };
    let (train, eval) = load_data(config, &encoder, runner, device, log)?;
    let (first, last) = step_range(config, options, run.state.step);
    let data = train.describe();
    let max_len = config
        .data
        .max_sample_tokens
        .unwrap_or(encoder.model.text.max_position_embeddings);
    let samples = prefetch(
        train,
        &encoder,
        config.run.seed,
        (
            run.state.samples_seen,
            config.run.batch_size * config.run.grad_accum,
            last - first,
        ),
        max_len,
    );
    Ok((samples, eval, data))
}

/// The steps this invocation runs: from the state's step to `run.steps`, or fewer
/// with `stop_after`.
pub(crate) fn step_range(
    config: &TrainConfig,
    options: &TrainOptions,
    first: usize,
) -> (usize, usize) {
    let total = config.run.steps;
    let last = options.stop_after.map_or(total, |n| (first + n).min(total));
    (first, last)
}

/// One optimizer step's results.
pub(crate) struct StepDone {
    pub loss: f32,
    pub lr: f64,
    pub grad_norm: f32,
    pub tokens: usize,
    pub flops: f64,
    /// The step's parts, with `TrainOptions::phase_timings`.
    pub phases: Option<StepPhases>,
}

/// Forward and backward (on the compute copy under 16-bit compute) and clipping of
/// step `step` (0-based) over `samples`: the gradients for the AdamW update at `lr`.
/// `clock` times the parts when it is on (the caller adds the update's).
fn one_step(
    run: &Prepared,
    config: &TrainConfig,
    runner: &dyn StepRunner,
    samples: &[Sample],
    step: usize,
    device: &Device,
    clock: &mut PhaseClock<'_>,
) -> Result<(StepDone, GradientsParams), TrainError> {
    let micro: Vec<Vec<&Sample>> = samples
        .chunks(config.run.batch_size)
        .map(|chunk| chunk.iter().collect())
        .collect();
    if run.plan.text == longview_models::attention::AttentionImpl::Reference
        && let Some(available) = longview_infer::prefill::available_bytes(None, device)
    {
        let heads = run.vlm_config.text.num_heads;
        for batch in &micro {
            let longest = batch.iter().map(|s| s.ids.len()).max().unwrap_or(0);
            crate::states_memory::check_reference_attention(
                (batch.len(), heads, longest),
                available,
            )
            .map_err(|e| TrainError::Request(format!("step {}: {e}", step + 1)))?;
        }
    }
    let seq_lens: Vec<usize> = samples.iter().map(|s| s.ids.len()).collect();
    let frames: usize = samples.iter().map(|s| s.frames).sum();
    let flops = train_flops(&run.model, &run.vlm_config, &seq_lens, frames);
    let supervised: usize = samples.iter().map(|s| s.supervised()).sum();
    let tokens: usize = seq_lens.iter().sum();
    let mut phases = StepPhases::default();
    clock.lap()?;
    let (loss, mut grads) = if run.master {
        let working = run.compute_copy(&run.model);
        phases.compute_copy_s = clock.lap()?;
        let (loss, mut grads) = runner.step(&working, &micro, supervised, device)?;
        phases.forward_backward_s = clock.lap()?;
        cast_grads(&run.model, &mut grads, DType::F32);
        phases.grads_to_f32_s = clock.lap()?;
        (loss, grads)
    } else {
        let stepped = runner.step(&run.model, &micro, supervised, device)?;
        phases.forward_backward_s = clock.lap()?;
        stepped
    };
    let grad_norm = global_grad_norm(&run.model, &grads);
    let clip = config.optim.clip_grad_norm as f32;
    if clip > 0.0 && grad_norm > clip {
        scale_grads(&run.model, &mut grads, clip / grad_norm);
    }
    phases.clip_s = clock.lap()?;
    let lr = learning_rate(&config.optim, step, config.run.steps);
    Ok((
        StepDone {
            loss,
            lr,
            grad_norm,
            tokens,
            flops,
            phases: clock.on().then_some(phases),
        },
        grads,
    ))
}

#[cfg(test)]
mod tests {
    use super::SteadyRate;

    /// The first step (compilation, tuning) is left out; the median and the rates
    /// come from the others.
    #[test]
    fn steady_rate_leaves_out_the_first_step() {
        assert_eq!(SteadyRate::after_first(&[]), None);
        assert_eq!(SteadyRate::after_first(&[(30.0, 1e12, 100)]), None);
        let rate = SteadyRate::after_first(&[
            (30.0, 5e12, 1000),
            (2.0, 4e12, 1000),
            (4.0, 4e12, 1000),
            (3.0, 4e12, 1000),
        ])
        .unwrap();
        assert_eq!(rate.steps, 3);
        assert_eq!(rate.median_step_s, 3.0);
        assert!((rate.tokens_per_s - 3000.0 / 9.0).abs() < 1e-9);
        assert!((rate.model_tflops - 12.0 / 9.0).abs() < 1e-9);
        let even = SteadyRate::after_first(&[(9.0, 0.0, 0), (1.0, 0.0, 0), (3.0, 0.0, 0)]);
        assert_eq!(even.unwrap().median_step_s, 2.0);
    }
}
