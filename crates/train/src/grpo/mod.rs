//! LongVILA-R1's reinforcement learning stage: GRPO on video questions
//! (`model.stage = "grpo"`, settings in `[grpo]`, `docs/algorithms.md` section 9).
//!
//! Each step draws `run.batch_size` prompts, encodes each video once and keeps its
//! visual tokens (MR-SP's embedding cache), samples `grpo.group_size` responses per
//! prompt over one shared prefill ([`longview_infer::generate::generate_group`]),
//! scores them ([`reward`]), and runs `grpo.minibatches` AdamW updates of the clipped
//! objective ([`loss`]) with the reference's (and, with several mini-batches, the old
//! policy's) log-probs recomputed in the rollout's layout ([`logprobs`]; on one device
//! each group's prompt runs once, [`shared_prefix`]). The reference is the starting model
//! (`model.init_from`, or the random initialisation, saved to `<run.out>/reference`).
//! Where the passes run is [`passes`]: one device, or a sequence-parallel group
//! ([`passes::SpPasses`]: frames shared out, SP prefill and decode, [`sp_logprobs`]).

pub mod actor;
pub mod config;
pub mod logprobs;
pub mod loss;
mod metrics;
pub mod passes;
mod prefix_attention;
pub mod reward;
pub mod shared_prefix;
pub mod sp_logprobs;
pub mod step;

use std::path::PathBuf;
use std::time::Instant;

use burn::module::Module;
use burn::tensor::{DType, Device};
use longview_infer::generate::{Decoding, GenerateOptions, generate, stop_tokens};
use longview_infer::needle::sample_visual;
use longview_models::Vlm;
use longview_models::hf::checkpoint::{SaveOptions, load_vila, save_vila};

use crate::config::TrainConfig;
use crate::data::Sample;
use crate::error::TrainError;
use crate::grads::{cast_grads, cast_params, learning_rate};
use crate::prepare::{Prepared, init_dir, prepare};
use crate::skips::SkipLog;
use crate::trainer::{SingleDevice, StepRunner, TrainOptions, start_data};
use crate::zero::{CheckpointOf, save_checkpoint};
use metrics::GrpoSinks;
use passes::{OneDevice, Passes};
use reward::{Reward, ground_truth, is_correct};
use step::{StepReport, rollouts, token_count, update};

/// What a GRPO run did.
#[derive(Debug, Clone)]
pub struct GrpoSummary {
    pub first_step: usize,
    pub last_step: usize,
    /// This invocation's steps, in order.
    pub reports: Vec<StepReport>,
    /// Held-out accuracy of greedy answers before the first and after the last step
    /// of this invocation (when the data has a held-out set).
    pub eval_before: Option<f64>,
    pub eval_after: Option<f64>,
    pub checkpoint: Option<PathBuf>,
    pub elapsed_s: f64,
}

/// Runs (or resumes) a GRPO run on one device with LongVILA-R1's reward
/// ([`ThinkAnswerReward`]); `log` receives human-readable lines.
pub fn train_grpo(
    config: &TrainConfig,
    options: &TrainOptions,
    device: &Device,
    log: &mut dyn FnMut(&str),
) -> Result<GrpoSummary, TrainError> {
    train_grpo_with(config, options, device, log, &config.grpo.reward())
}

/// [`train_grpo`] with another reward.
pub fn train_grpo_with(
    config: &TrainConfig,
    options: &TrainOptions,
    device: &Device,
    log: &mut dyn FnMut(&str),
    reward: &dyn Reward,
) -> Result<GrpoSummary, TrainError> {
    let runner = SingleDevice::default();
    let passes = OneDevice {
        recompute: config.run.recompute,
    };
    train_grpo_on(config, options, device, log, reward, &runner, &passes)
}

/// One rank of a GRPO run: `runner` says whether this rank writes (metrics,
/// checkpoints) and keeps the ranks' starting weights and shared files in step
/// (e.g. [`crate::mmsp::MmSp`] over a sequence-parallel group), `passes` where the
/// model passes run ([`passes::SpPasses`] for that group).
pub fn train_grpo_on(
    config: &TrainConfig,
    options: &TrainOptions,
    device: &Device,
    log: &mut dyn FnMut(&str),
    reward: &dyn Reward,
    runner: &dyn StepRunner,
    passes: &dyn Passes,
) -> Result<GrpoSummary, TrainError> {
    let g = &config.grpo;
    g.check(config.run.batch_size)
        .map_err(|(key, message)| TrainError::Config {
            source_name: "(grpo)".into(),
            message: format!("`{key}`: {message}"),
        })?;
    let mut run = prepare(config, options, device, log, runner)?;
    // The passes choose their attention themselves: the model keeps its block kind
    // (a sequence-parallel plan would have made it the sharded one).
    let blocks = run.model.vision_attention();
    run.model = run.model.clone().with_attention(blocks, blocks);
    let reference = reference_model(config, &run, runner, device, log)?;
    let (samples, eval, data) = start_data(&run, config, options, runner, device, log)?;
    log(&format!("data: {data}"));
    let stop = stop_tokens(&run.tokenizer);
    let total = config.run.steps;
    let (first, last) = crate::trainer::step_range(config, options, run.state.step);
    let timer = Instant::now();
    // The same on every rank: only the writer scores it.
    let eval = if runner.writes() { eval } else { Vec::new() };
    let eval_before = held_out(&run, &eval, &stop, g.max_response_tokens, device)?;
    if let Some(acc) = eval_before {
        log(&format!(
            "held-out accuracy before step {}: {:.1}%",
            first + 1,
            100.0 * acc
        ));
    }
    let mut sinks = GrpoSinks::open(&config.run.out, runner.writes(), first)?;
    if let Some(acc) = eval_before {
        sinks.held_out(first, acc)?;
    }
    let mut skips = SkipLog::open(
        &config.run.out,
        runner.writes(),
        run.state.skipped,
        config.data.max_skipped_fraction,
    );
    let mut reports = Vec::new();
    let mut saved = None;
    for step in first..last {
        let drawn = samples
            .recv()
            .map_err(|_| TrainError::Request("the data worker stopped".into()))??;
        for skip in &drawn.skipped {
            log(&format!("skipped sample {}: {}", skip.index, skip.reason));
        }
        let used = run.state.samples_seen + drawn.samples.len();
        skips.record(step + 1, used, &drawn.skipped)?;
        run.state.skipped = skips.total;
        let batch = drawn.samples;
        let report = grpo_step(
            &mut run,
            runner,
            passes,
            reference.as_ref(),
            &batch,
            &stop,
            reward,
            config,
            step,
            device,
        )?;
        run.state.step = step + 1;
        run.state.samples_seen += batch.len();
        run.state.losses.push(report.loss);
        run.state.elapsed_s += report.rollout_s + report.update_s;
        let lr = learning_rate(&config.optim, step, total);
        let skipped = skips.total;
        sinks.step(step + 1, lr, skipped, &report)?;
        log(&step_line(step + 1, total, &report));
        reports.push(report);
        let done = step + 1;
        let due = done % config.run.checkpoint_every == 0 || done == last;
        if due {
            sinks.flush()?;
            let of = CheckpointOf {
                out: &config.run.out,
                model: &run.model,
                config: &run.vlm_config,
                state: &run.state,
                tokenizer_json: &run.tokenizer_json,
                keep: config.run.keep_checkpoints,
            };
            if let Some(dir) = save_checkpoint(of, &run.optim, runner, device)? {
                saved = Some(dir);
            }
        }
    }
    let eval_after = held_out(&run, &eval, &stop, g.max_response_tokens, device)?;
    if let Some(acc) = eval_after {
        log(&format!(
            "held-out accuracy after step {last}: {:.1}%",
            100.0 * acc
        ));
        sinks.held_out(last, acc)?;
    }
    sinks.flush()?;
    Ok(GrpoSummary {
        first_step: first,
        last_step: run.state.step,
        reports,
        eval_before,
        eval_after,
        checkpoint: saved,
        elapsed_s: timer.elapsed().as_secs_f64(),
    })
}

/// The log line of a finished step.
fn step_line(step: usize, total: usize, r: &StepReport) -> String {
    format!(
        "step {step}/{total}: reward {:.3} ± {:.3} acc {:.1}% format {:.1}% kl {:.4} clip {:.3} len {:.1} rollout {:.1}s (encode {:.1}s, prefill {:.1}s, decode {:.1}s at {:.0} tok/s) update {:.1}s",
        r.reward_mean,
        r.reward_std,
        100.0 * r.accuracy,
        100.0 * r.format_rate,
        r.kl,
        r.clip_fraction,
        r.response_tokens_mean,
        r.rollout_s,
        r.encode_s,
        r.prefill_s,
        r.decode_s,
        r.decode_tokens_per_s,
        r.update_s,
    )
}

/// Rollouts with the current policy, then the updates.
#[allow(clippy::too_many_arguments)]
fn grpo_step(
    run: &mut Prepared,
    runner: &dyn StepRunner,
    passes: &dyn Passes,
    reference: Option<&Vlm>,
    batch: &[Sample],
    stop: &[u32],
    reward: &dyn Reward,
    config: &TrainConfig,
    step: usize,
    device: &Device,
) -> Result<StepReport, TrainError> {
    let g = &config.grpo;
    let timer = Instant::now();
    let mut working = run.compute_copy(&run.model);
    let policy = working.valid();
    let inner = device.clone().inner();
    let (groups, times) = rollouts(
        passes,
        &policy,
        batch,
        &run.tokenizer,
        stop,
        reward,
        g,
        config.run.seed,
        step,
        &inner,
    )?;
    drop(policy);
    let rollout_s = timer.elapsed().as_secs_f64();
    let generated: usize = groups.iter().map(token_count).sum();

    let lr = learning_rate(&config.optim, step, config.run.steps);
    let (compute, master) = (run.compute, run.master);
    let optim = &mut run.optim;
    let mut master_weights = master.then(|| run.model.clone());
    let mut apply = |working: Vlm, mut grads| match &mut master_weights {
        Some(weights) => {
            cast_grads(weights, &mut grads, DType::F32);
            let updated = runner.update(optim, lr, weights.clone(), grads)?;
            *weights = updated.clone();
            Ok(cast_params(updated, compute))
        }
        None => runner.update(optim, lr, working, grads),
    };
    let clip = config.optim.clip_grad_norm as f32;
    let mut report = update(
        passes,
        &mut working,
        reference,
        groups,
        g,
        clip,
        device,
        &mut apply,
    )?;
    run.model = master_weights.unwrap_or(working);
    report.rollout_s = rollout_s;
    report.encode_s = times.encode_s;
    report.prefill_s = times.generation.prefill_s;
    report.decode_s = times.generation.decode_s;
    report.decode_tokens_per_s = generated as f64 / report.decode_s.max(1e-9);
    report.reserved_bytes = device.memory_pool_usage().map(|m| m.bytes_reserved);
    Ok(report)
}

/// The frozen reference (untracked): the starting weights, read from disk so that a
/// resumed run gets exactly the same ones: `model.init_from`, or for a run from
/// random weights the copy of them the writing rank saves to `<run.out>/reference`
/// before the first step. Built only when the KL term is on.
fn reference_model(
    config: &TrainConfig,
    run: &Prepared,
    runner: &dyn StepRunner,
    device: &Device,
    log: &mut dyn FnMut(&str),
) -> Result<Option<Vlm>, TrainError> {
    if config.grpo.kl_coef == 0.0 {
        return Ok(None);
    }
    let dir = match init_dir(config)? {
        Some(dir) => dir,
        None => {
            let dir = config.run.out.join("reference");
            if run.state.step == 0 && runner.writes() {
                let options = SaveOptions {
                    dtype: DType::F32,
                    max_shard_bytes: Some(5 << 30),
                };
                save_vila(&run.model, &run.vlm_config, &dir, options)?;
            }
            // The writer saved it; the other ranks read it after this.
            runner.barrier(device)?;
            if !dir.join("config.json").exists() {
                return Err(TrainError::checkpoint(
                    &dir,
                    "the run's reference weights (written at its start) are missing",
                ));
            }
            dir
        }
    };
    log(&format!("reference for the KL term: {}", dir.display()));
    let (mut model, _) = load_vila(&dir, device)?;
    // Scored over the same ids as the policy (an `init_from` folder written by
    // another tool has no saved limit): otherwise the KL term would compare
    // log-softmaxes over different vocabularies.
    model.generation_vocab = run.model.generation_vocab;
    let model = cast_params(model, run.compute);
    let blocks = run.model.vision_attention();
    Ok(Some(model.with_attention(blocks, blocks).valid()))
}

/// Share of held-out samples whose greedy answer (inside `<answer>`, else the whole
/// response) matches.
fn held_out(
    run: &Prepared,
    eval: &[Sample],
    stop: &[u32],
    max_tokens: usize,
    device: &Device,
) -> Result<Option<f64>, TrainError> {
    if eval.is_empty() {
        return Ok(None);
    }
    let policy = run.scoring_copy();
    let inner = device.clone().inner();
    let options = GenerateOptions::new(max_tokens, Decoding::Greedy, stop.to_vec());
    let mut correct = 0;
    for sample in eval {
        let visual = sample_visual(sample, &inner);
        let prompt = &sample.ids[..sample.prompt_len];
        let answer = generate(&policy, prompt, visual, &options, &inner)?;
        let text = run.tokenizer.decode(&answer, true)?;
        correct += usize::from(is_correct(&text, ground_truth(&sample.answer)));
    }
    Ok(Some(correct as f64 / eval.len() as f64))
}
