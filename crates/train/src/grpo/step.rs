//! One GRPO step on one device: rollouts for a batch of prompts (each video encoded
//! once, its visual tokens reused by every pass: the G samples' shared prefill, the
//! old-policy, reference and actor log-prob passes), rewards and group advantages,
//! then `minibatches` AdamW updates of the clipped-ratio + KL objective.

use std::time::Instant;

use burn::module::Module;

use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Device, Tensor, TensorData};
use longview_data::TextTokenizer;
use longview_infer::batch::BatchTimes;
use longview_infer::generate::{Decoding, GenerateOptions, Generation};
use longview_models::{VisualInput, Vlm};

use super::config::GrpoConfig;
use super::logprobs::{ResponseLogprobs, Rollout};
use super::loss::{Aggregation, group_advantages, masked_sum, token_losses};
use super::passes::{Passes, PromptSamples};
use super::reward::{Reward, Scored, ground_truth};
use crate::data::Sample;
use crate::error::TrainError;
use crate::grads::{global_grad_norm, scale_grads};
use longview_infer::needle::sample_visual;
use longview_infer::sample::mix;

/// One prompt's rollouts.
pub struct Group {
    pub prompt: Vec<u32>,
    /// The prompt's frames (`[frames, 3, side, side]`, untracked), kept only when
    /// every pass re-encodes them.
    pixels: Option<Tensor<4>>,
    /// Visual tokens from the rollout's encoding, untracked: what every pass reuses.
    visual: Option<Tensor<3>>,
    pub generations: Vec<Generation>,
    pub scores: Vec<Scored>,
    pub advantages: Vec<f32>,
}

/// What a step did, for the metrics.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StepReport {
    pub reward_mean: f32,
    pub reward_std: f32,
    pub accuracy: f32,
    pub format_rate: f32,
    pub response_tokens_mean: f32,
    pub kl: f32,
    pub clip_fraction: f32,
    pub entropy: f32,
    pub loss: f32,
    pub grad_norm: f32,
    /// Groups dropped because every reward was equal (`grpo.drop_equal_groups`).
    pub dropped_groups: usize,
    /// Optimizer updates skipped for a non-finite gradient norm.
    pub skipped_updates: usize,
    /// Largest |rollout log-prob - recomputed old log-prob| over the step's tokens: a
    /// rollout/training layout mismatch shows here.
    pub logprob_mismatch: f32,
    /// Encoding, prefill and sampling of the step's rollouts.
    pub rollout_s: f64,
    /// Of `rollout_s`: the videos' encoding (device synchronised after it).
    pub encode_s: f64,
    /// Of `rollout_s`: every prompt's prefill.
    pub prefill_s: f64,
    /// Of `rollout_s`: the decoding steps of every response (sampling included).
    pub decode_s: f64,
    pub update_s: f64,
    /// Response tokens over `decode_s`, all rows of the batch together.
    pub decode_tokens_per_s: f64,
    /// The device allocator's reservation after the step (bytes), where the backend
    /// reports it: the step's high-water mark, as the pool does not shrink.
    pub reserved_bytes: Option<u64>,
}

/// Where a step's rollout time went: the videos' encoding (seconds), then the
/// prefill and decoding.
#[derive(Debug, Clone, Copy, Default)]
pub struct RolloutTimes {
    pub encode_s: f64,
    pub generation: BatchTimes,
}

/// Samples `config.group_size` responses for each sample's prompt with `policy`
/// (untracked), scores them and computes the group advantages. Sample seeds are a
/// function of `(seed, step, prompt, sample)`, so a resumed run repeats them.
#[allow(clippy::too_many_arguments)]
pub fn rollouts(
    passes: &dyn Passes,
    policy: &Vlm,
    samples: &[Sample],
    tokenizer: &TextTokenizer,
    stop: &[u32],
    reward: &dyn Reward,
    config: &GrpoConfig,
    seed: u64,
    step: usize,
    device: &Device,
) -> Result<(Vec<Group>, RolloutTimes), TrainError> {
    let timer = Instant::now();
    let options = GenerateOptions {
        prefill_chunk: config.prefill_chunk,
        ..GenerateOptions::new(config.max_response_tokens, Decoding::Greedy, stop.to_vec())
    };
    // Every prompt's video encoded once; then all prompts' samples decode together.
    let mut prompts = Vec::with_capacity(samples.len());
    let mut encoded = Vec::with_capacity(samples.len());
    for (p, sample) in samples.iter().enumerate() {
        let prompt = sample.ids[..sample.prompt_len].to_vec();
        let pixels = match sample_visual(sample, device) {
            VisualInput::Pixels(pixels) => Some(pixels),
            _ => None,
        };
        // Encoded once; the rollouts' prefill and every log-prob pass reuse it.
        let visual = match &pixels {
            Some(p) => Some(passes.encode(policy, p.clone())?),
            None => None,
        };
        let decodings: Vec<Decoding> = (0..config.group_size)
            .map(|g| Decoding::TopP {
                top_p: config.top_p,
                temperature: config.temperature,
                seed: mix(mix(seed ^ 0x6772_706f, step as u64), (p * 1_000 + g) as u64),
            })
            .collect();
        let input = visual
            .clone()
            .map_or(VisualInput::None, VisualInput::Embeddings);
        prompts.push(PromptSamples {
            prompt: prompt.clone(),
            visual: input,
            samples: decodings,
        });
        encoded.push((prompt, pixels, visual));
    }
    device
        .sync()
        .map_err(|e| TrainError::Device(format!("synchronising after encoding: {e:?}")))?;
    let encode_s = timer.elapsed().as_secs_f64();
    let (generated, generation) = passes.generate(policy, prompts, &options, device)?;
    let times = RolloutTimes {
        encode_s,
        generation,
    };
    let mut groups = Vec::with_capacity(samples.len());
    for ((sample, (prompt, pixels, visual)), generations) in
        samples.iter().zip(encoded).zip(generated)
    {
        let truth = ground_truth(&sample.answer);
        let scores: Vec<Scored> = generations
            .iter()
            .map(|g| Ok(reward.score(&tokenizer.decode(&g.tokens, true)?, truth)))
            .collect::<Result<_, TrainError>>()?;
        groups.push(Group {
            prompt,
            pixels: config.reencode_video.then_some(pixels).flatten(),
            visual,
            generations,
            scores,
            advantages: Vec::new(),
        });
    }
    Ok((groups, times))
}

/// The visual tokens of a group's passes under `model`: the rollout's, or the frames
/// encoded again (`grpo.reencode_video`).
fn group_visual(model: &Vlm, group: &Group, tracked: bool) -> Option<Tensor<3>> {
    match (&group.pixels, tracked) {
        (Some(pixels), true) => Some(model.encode_frames(pixels.clone().autodiff())),
        (Some(pixels), false) => Some(model.encode_frames(pixels.clone())),
        (None, true) => group.visual.clone().map(|v| v.autodiff()),
        (None, false) => group.visual.clone(),
    }
}

impl Group {
    /// The group as its log-prob passes see it, with `visual` as its visual tokens.
    fn rollout<'a>(
        &'a self,
        visual: Option<&'a Tensor<3>>,
        responses: &'a [Vec<u32>],
        temperature: f64,
    ) -> Rollout<'a> {
        Rollout {
            prompt: &self.prompt,
            visual,
            responses,
            temperature,
        }
    }
}

fn responses(group: &Group) -> Vec<Vec<u32>> {
    group.generations.iter().map(|g| g.tokens.clone()).collect()
}

/// The rollout batch's updates: advantages, old and reference log-probs, then
/// `config.minibatches` AdamW steps. `step_fn` applies one update given the
/// gradients; returns the step's report (rollout fields filled by the caller).
#[allow(clippy::too_many_arguments)]
pub fn update(
    passes: &dyn Passes,
    model: &mut Vlm,
    reference: Option<&Vlm>,
    mut groups: Vec<Group>,
    config: &GrpoConfig,
    clip_grad_norm: f32,
    device: &Device,
    apply: &mut dyn FnMut(Vlm, GradientsParams) -> Result<Vlm, TrainError>,
) -> Result<StepReport, TrainError> {
    let timer = Instant::now();
    let mut report = StepReport::default();
    let all: Vec<Scored> = groups.iter().flat_map(|g| g.scores.clone()).collect();
    let n = all.len().max(1) as f32;
    report.reward_mean = all.iter().map(|s| s.total).sum::<f32>() / n;
    report.reward_std = (all
        .iter()
        .map(|s| (s.total - report.reward_mean).powi(2))
        .sum::<f32>()
        / (n - 1.0).max(1.0))
    .sqrt();
    report.accuracy = all.iter().map(|s| s.accuracy).sum::<f32>() / n;
    report.format_rate = all.iter().map(|s| s.format).sum::<f32>() / n;
    report.response_tokens_mean = groups.iter().map(token_count).sum::<usize>() as f32 / n;

    for group in &mut groups {
        let rewards: Vec<f32> = group.scores.iter().map(|s| s.total).collect();
        group.advantages = group_advantages(&rewards, config.loss.normalize_std());
    }
    if config.drop_equal_groups {
        let before = groups.len();
        groups.retain(|g| g.scores.iter().any(|s| s.total != g.scores[0].total));
        report.dropped_groups = before - groups.len();
    }
    // Old-policy and reference log-probs, before any update, untracked. With one
    // optimizer step per rollout batch the actor's own log-probs, taken before that
    // step, are the old policy's: the ratio is exp(logp - sg(logp)) and the separate
    // pass is skipped (`Old::Actor`).
    let on_policy = config.minibatches == 1;
    let plain = model.valid();
    let inner = device.clone().inner();
    let mut fixed = Vec::with_capacity(groups.len());
    for group in &groups {
        let responses = responses(group);
        let visual = group_visual(&plain, group, false);
        let rollout = group.rollout(visual.as_ref(), &responses, config.temperature);
        let old = if token_count(group) == 0 {
            None
        } else if on_policy {
            Some(Old::Actor)
        } else {
            let old = passes.whole_logprobs(&plain, &rollout, &inner)?;
            if let Some(old) = &old {
                report.logprob_mismatch = report.logprob_mismatch.max(mismatch(group, old, None));
            }
            old.map(Old::Pass)
        };
        let reference = match reference {
            Some(r) if config.kl_coef > 0.0 => {
                let visual = group_visual(r, group, false);
                let rollout = group.rollout(visual.as_ref(), &responses, config.temperature);
                passes.whole_logprobs(r, &rollout, &inner)?
            }
            _ => None,
        };
        fixed.push((old, reference));
    }
    drop(plain);

    let per_batch = groups.len().div_ceil(config.minibatches.max(1)).max(1);
    let order: Vec<usize> = (0..groups.len()).collect();
    let (mut kl_sum, mut clip_sum, mut entropy_sum, mut tokens_sum, mut loss_sum) =
        (0.0f32, 0.0f32, 0.0f32, 0.0f32, 0.0f32);
    for batch in order.chunks(per_batch) {
        let denominator = match config.loss.aggregation() {
            Aggregation::TokenMean => batch
                .iter()
                .map(|&i| token_count(&groups[i]))
                .sum::<usize>() as f32,
            Aggregation::SeqSumNorm => {
                (batch
                    .iter()
                    .map(|&i| groups[i].generations.len())
                    .sum::<usize>()
                    * config.max_response_tokens) as f32
            }
        };
        if denominator == 0.0 {
            continue;
        }
        let mut accumulator = GradientsAccumulator::<Vlm>::new();
        let mut any = false;
        for &i in batch {
            let group = &groups[i];
            let (Some(old), reference) = &fixed[i] else {
                continue;
            };
            let visual = group_visual(model, group, true);
            let responses = responses(group);
            let rollout = group.rollout(visual.as_ref(), &responses, config.temperature);
            let advantages = Tensor::<1>::from_data(
                TensorData::new(group.advantages.clone(), [group.advantages.len()]),
                device,
            );
            // The group's GRPO loss from the actor's tracked log-probs, with its
            // statistics: loss, KL, clipped and entropy sums, tokens.
            let mut worst = 0.0f32;
            let mut loss_of = |actor: ResponseLogprobs| {
                let old = match old {
                    Old::Pass(old) => old.clone().autodiff(),
                    Old::Actor => {
                        let taken = actor.logp.clone().detach();
                        worst = mismatch(
                            group,
                            &taken.clone().inner(),
                            Some(&actor.mask.clone().inner()),
                        );
                        taken
                    }
                };
                let losses = token_losses(
                    actor.logp,
                    old,
                    reference.clone().map(|r| r.autodiff()),
                    advantages.clone(),
                    &config.settings(),
                );
                let loss = masked_sum(losses.loss, actor.mask.clone()).div_scalar(denominator);
                let host = |t: Tensor<1>| t.inner().into_scalar::<f32>();
                let stats = vec![
                    host(loss.clone().detach()),
                    host(masked_sum(losses.kl.detach(), actor.mask.clone())),
                    host(masked_sum(losses.clipped.detach(), actor.mask.clone())),
                    host(actor.entropy.sum()),
                    host(actor.mask.sum()),
                ];
                Ok((loss, stats))
            };
            let Some((stats, grads)) = passes.actor_grads(model, &rollout, device, &mut loss_of)?
            else {
                continue;
            };
            report.logprob_mismatch = report.logprob_mismatch.max(worst);
            loss_sum += stats[0];
            kl_sum += stats[1];
            clip_sum += stats[2];
            entropy_sum += stats[3];
            tokens_sum += stats[4];
            accumulator.accumulate(model, grads);
            any = true;
        }
        if !any {
            continue;
        }
        let mut grads = passes.reduce_grads(model, accumulator.grads())?;
        let norm = global_grad_norm(model, &grads);
        report.grad_norm = norm;
        if !norm.is_finite() {
            report.skipped_updates += 1;
            continue;
        }
        if clip_grad_norm > 0.0 && norm > clip_grad_norm {
            scale_grads(model, &mut grads, clip_grad_norm / norm);
        }
        *model = apply(model.clone(), grads)?;
    }
    let sums = passes.sum(
        vec![kl_sum, clip_sum, entropy_sum, tokens_sum, loss_sum],
        &inner,
    )?;
    let tokens = sums[3].max(1.0);
    report.kl = sums[0] / tokens;
    report.clip_fraction = sums[1] / tokens;
    report.entropy = sums[2] / tokens;
    report.loss = sums[4];
    report.update_s = timer.elapsed().as_secs_f64();
    Ok(report)
}

/// Response tokens of a group.
pub(crate) fn token_count(group: &Group) -> usize {
    group.generations.iter().map(|g| g.tokens.len()).sum()
}

/// The old policy's log-probs of a group: a pass of their own, or the actor's taken
/// before the rollout batch's only optimizer step.
#[allow(clippy::large_enum_variant)] // one per group, never moved in a hot loop
enum Old {
    Pass(Tensor<2>),
    Actor,
}

/// Largest |sampling log-prob - recomputed log-prob| over a group's tokens: every
/// token, or those where `mask` (`[responses, width]`, untracked) is 1 (a
/// sequence-parallel rank's share of them).
fn mismatch(group: &Group, recomputed: &Tensor<2>, mask: Option<&Tensor<2>>) -> f32 {
    let [_, width] = recomputed.dims();
    let host = |t: &Tensor<2>| {
        t.clone()
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap_or_default()
    };
    let values = host(recomputed);
    let mask = mask.map(host);
    let mut worst = 0.0f32;
    for (i, generation) in group.generations.iter().enumerate() {
        for (k, &sampled) in generation.logprobs.iter().enumerate() {
            let counted = mask
                .as_ref()
                .is_none_or(|m| m.get(i * width + k).is_some_and(|&x| x > 0.0));
            if counted {
                worst = worst.max((values[i * width + k] - sampled).abs());
            }
        }
    }
    worst
}
