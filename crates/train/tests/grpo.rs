//! GRPO on the CPU: the log-prob pass in the rollout's layout, cached visual tokens
//! against re-encoded frames, and a short run that raises the mean reward.

use std::path::PathBuf;

use burn::module::Module;
use burn::tensor::{Device, Distribution, Tensor};
use longview_models::VlmConfig;
use longview_train::grpo::logprobs::{Rollout, response_logprobs};
use longview_train::grpo::reward::{Reward, Scored};
use longview_train::grpo::train_grpo_with;
use longview_train::{Stage, TrainConfig, TrainOptions};

mod common;
use common::{ActorCase, TempDir, assert_grads_close, no_progress, nonlinear_loss, serial};

fn host(t: Tensor<2>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

#[test]
fn cached_visual_tokens_give_the_re_encoded_log_probs_and_gradients() {
    let _serial = serial();
    let device = Device::flex().autodiff();
    device.seed(3);
    let config = VlmConfig::debug();
    let model = config.init(&device);
    let per_frame = config.tokens_per_frame();
    let mut prompt: Vec<u32> = vec![4, 9];
    prompt.extend(std::iter::repeat_n(
        model.placeholder_token_id,
        2 * per_frame,
    ));
    prompt.extend([11, 6]);
    let responses = vec![vec![20, 21, 22], vec![30], vec![40, 41]];
    let side = config.vision.image_size;
    let pixels = Tensor::<4>::random([2, 3, side, side], Distribution::Normal(0.0, 1.0), &device);

    let cached = model
        .valid()
        .encode_frames(pixels.clone().inner())
        .autodiff();
    let rollout = |visual| Rollout {
        prompt: &prompt,
        visual: Some(visual),
        responses: &responses,
        temperature: 0.7,
    };
    let with_cache = response_logprobs(&model, &rollout(&cached), &device)
        .unwrap()
        .unwrap();
    let encoded = model.encode_frames(pixels);
    let re_encoded = response_logprobs(&model, &rollout(&encoded), &device)
        .unwrap()
        .unwrap();
    let (a, b) = (host(with_cache.logp.clone()), host(re_encoded.logp.clone()));
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
    }
    assert_eq!(
        host(with_cache.mask.clone()),
        vec![1., 1., 1., 1., 0., 0., 1., 1., 0.]
    );
    // The LLM's gradients are the same either way (the vision tower gets some only
    // from the re-encoded pass).
    let g1 = with_cache.logp.sum().backward();
    let g2 = re_encoded.logp.sum().backward();
    let gamma = &model.llm.model.norm.gamma;
    let (d1, d2) = (gamma.grad(&g1).unwrap(), gamma.grad(&g2).unwrap());
    let (d1, d2) = (
        host(d1.unsqueeze_dim::<2>(0)),
        host(d2.unsqueeze_dim::<2>(0)),
    );
    let worst = d1
        .iter()
        .zip(&d2)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-5, "final-norm gradients differ by {worst}");
    assert!(d1.iter().any(|&x| x != 0.0), "the gradient is not zero");
}

/// Rewards responses for digits: the share of their characters that are ASCII digits.
/// A random-weight policy writes some by chance, so groups differ and GRPO has a
/// signal from the first step.
struct Digits;

impl Reward for Digits {
    fn score(&self, response: &str, _truth: &str) -> Scored {
        let chars = response.chars().count().max(1) as f32;
        let digits = response.chars().filter(char::is_ascii_digit).count() as f32;
        Scored {
            total: digits / chars,
            accuracy: 0.0,
            format: 0.0,
        }
    }
}

/// A GRPO run small enough for a test: 1-frame haystacks, groups of 8, 6 tokens.
fn tiny(out: PathBuf, cache: PathBuf, steps: usize) -> TrainConfig {
    let mut config = TrainConfig::default();
    config.run.out = out;
    config.run.steps = steps;
    config.run.batch_size = 4;
    config.run.checkpoint_every = steps;
    config.model.stage = Stage::Grpo;
    config.optim.lr = 1e-2;
    config.optim.warmup_steps = 0;
    config.optim.min_lr_ratio = 1.0;
    config.data.frames = 1;
    config.data.min_frames = 1;
    config.data.needle_copies = 1;
    config.data.eval_per_depth = 0;
    config.data.cache = Some(cache);
    config.grpo.group_size = 8;
    config.grpo.max_response_tokens = 6;
    config.grpo.kl_coef = 0.01;
    config
}

#[test]
fn grpo_raises_the_mean_reward_on_a_tiny_task() {
    let _serial = serial();
    let tmp = TempDir::new("digits");
    let config = tiny(tmp.0.join("run"), tmp.0.join("cache"), 30);
    let device = Device::flex().autodiff();
    let summary = train_grpo_with(&config, &no_progress(), &device, &mut |_| {}, &Digits).unwrap();
    let rewards: Vec<f32> = summary.reports.iter().map(|r| r.reward_mean).collect();
    let first: f32 = rewards[..5].iter().sum::<f32>() / 5.0;
    let last: f32 = rewards[rewards.len() - 5..].iter().sum::<f32>() / 5.0;
    println!("mean reward per step {rewards:?}");
    assert!(
        last > first + 0.5,
        "mean reward of the first 5 steps {first:.3}, of the last 5 {last:.3}"
    );
    // The rollout's sampling log-probs equal the actor's recomputed ones (same
    // weights, same layout, temperature in both).
    for r in &summary.reports {
        assert!(
            r.logprob_mismatch < 1e-4,
            "log-prob mismatch {}",
            r.logprob_mismatch
        );
        assert!(r.kl.is_finite() && r.kl >= 0.0);
        // The rollout's phases are timed apart and lie inside it.
        assert!(r.prefill_s > 0.0 && r.decode_s > 0.0 && r.decode_tokens_per_s > 0.0);
        let phases = r.encode_s + r.prefill_s + r.decode_s;
        assert!(
            phases <= r.rollout_s + 1e-6,
            "{phases} s of phases in {} s",
            r.rollout_s
        );
    }
    assert!(summary.checkpoint.is_some());
    // metrics.jsonl has a row a step; TensorBoard one reward scalar a step (the tag is
    // stored verbatim in each event).
    let rows = std::fs::read_to_string(config.run.out.join("metrics.jsonl")).unwrap();
    assert_eq!(rows.lines().count(), 30);
    let mut events = Vec::new();
    for entry in std::fs::read_dir(config.run.out.join("tensorboard")).unwrap() {
        events.extend(std::fs::read(entry.unwrap().path()).unwrap());
    }
    let tag = b"grpo/reward_mean";
    let count = events.windows(tag.len()).filter(|w| w == tag).count();
    assert_eq!(count, 30, "reward scalars in the event files");
}

/// Two optimizer steps per rollout batch: the old policy's log-probs come from a
/// separate untracked pass before the first; that pass matches the rollout's sampling
/// log-probs, and the run trains.
#[test]
fn several_minibatches_score_the_old_policy_in_a_pass_of_its_own() {
    let _serial = serial();
    let tmp = TempDir::new("minibatches");
    let mut config = tiny(tmp.0.join("run"), tmp.0.join("cache"), 3);
    config.grpo.minibatches = 2;
    let device = Device::flex().autodiff();
    let summary = train_grpo_with(&config, &no_progress(), &device, &mut |_| {}, &Digits).unwrap();
    assert_eq!(summary.reports.len(), 3);
    for r in &summary.reports {
        assert!(
            r.logprob_mismatch < 1e-4,
            "log-prob mismatch {}",
            r.logprob_mismatch
        );
        assert!(r.loss.is_finite() && r.kl.is_finite());
    }
    // The policy moved away from the reference.
    assert!(
        summary.reports.iter().any(|r| r.kl > 0.0),
        "{:?}",
        summary.reports
    );
}

#[test]
fn a_resumed_grpo_run_repeats_the_uninterrupted_one() {
    let _serial = serial();
    let tmp = TempDir::new("resume");
    let cache = tmp.0.join("cache");
    let device = Device::flex().autodiff();
    let whole = tiny(tmp.0.join("whole"), cache.clone(), 6);
    let straight = train_grpo_with(&whole, &no_progress(), &device, &mut |_| {}, &Digits).unwrap();
    let split = tiny(tmp.0.join("split"), cache, 6);
    let first = TrainOptions {
        stop_after: Some(3),
        ..no_progress()
    };
    let head = train_grpo_with(&split, &first, &device, &mut |_| {}, &Digits).unwrap();
    assert_eq!(head.last_step, 3);
    let resumed = TrainOptions {
        resume: true,
        ..no_progress()
    };
    let tail = train_grpo_with(&split, &resumed, &device, &mut |_| {}, &Digits).unwrap();
    assert_eq!((tail.first_step, tail.last_step), (3, 6));
    let curve = |reports: &[longview_train::grpo::step::StepReport]| {
        reports
            .iter()
            .map(|r| (r.reward_mean, r.loss, r.kl))
            .collect::<Vec<_>>()
    };
    let mut joined = curve(&head.reports);
    joined.extend(curve(&tail.reports));
    assert_eq!(joined, curve(&straight.reports));
    // The KL term saw a moving policy (else the reference's equality shows nothing).
    assert!(straight.reports.last().unwrap().kl > 0.0);
}

/// A starting model whose embedding table is wider than its tokenizer, saved as a
/// folder from another tool would be (no `longview_generation_vocab`): the policy
/// never samples the rows past the tokenizer (their ids decode to no text), and the
/// reference scores over the same ids, so the first step's KL (policy = reference)
/// is zero. Before the limit reached both, the rollout failed on an undecodable id
/// and the KL term compared log-softmaxes over different vocabularies.
#[test]
fn a_padded_vocabulary_is_neither_sampled_nor_scored() {
    use longview_data::TextTokenizer;
    use longview_models::hf::checkpoint::{SaveOptions, save_vila};
    use longview_train::trainer::model_config;
    let _serial = serial();
    let tmp = TempDir::new("padded");
    let start = tmp.0.join("start");
    let tokenizer = TextTokenizer::debug();
    let mut vlm = model_config(&TrainConfig::default(), &tokenizer).unwrap();
    vlm.text.vocab_size = tokenizer.vocab_size() + 512;
    vlm.generation_vocab = None;
    let device = Device::flex();
    device.seed(5);
    let options = SaveOptions {
        dtype: burn::tensor::DType::F32,
        max_shard_bytes: None,
    };
    save_vila(&vlm.init(&device), &vlm, &start, options).unwrap();
    std::fs::write(
        start.join("llm/tokenizer.json"),
        tokenizer.inner().to_string(false).unwrap(),
    )
    .unwrap();
    let mut config = tiny(tmp.0.join("run"), tmp.0.join("cache"), 1);
    config.model.init_from = Some(start);
    let summary = train_grpo_with(
        &config,
        &no_progress(),
        &Device::flex().autodiff(),
        &mut |_| {},
        &Digits,
    )
    .unwrap();
    let first = &summary.reports[0];
    // The policy and the reference are the same weights before the first update:
    // k3 is exactly zero then, up to f32 rounding of the log-probs.
    assert!(first.kl.abs() < 1e-6, "first step's KL {}", first.kl);
    assert!(first.logprob_mismatch < 1e-4, "{}", first.logprob_mismatch);
}

#[test]
fn grpo_on_sequence_parallel_ranks_repeats_the_one_device_run() {
    use longview_comm::{Communicator, LocalWorld};
    use longview_parallel::inference::{Heads, SpScheme};
    use longview_train::grpo::passes::SpPasses;
    use longview_train::grpo::train_grpo_on;
    use longview_train::mmsp::MmSp;
    let _serial = serial();
    let tmp = TempDir::new("sp");
    let cache = tmp.0.join("cache");
    // A saved starting point, so that every layout starts from the same weights.
    let mut start = tiny(tmp.0.join("start"), cache.clone(), 1);
    start.model.stage = longview_train::Stage::LongVideoSft;
    longview_train::train(
        &start,
        &no_progress(),
        &Device::flex().autodiff(),
        &mut |_| {},
    )
    .unwrap();
    let mut config = tiny(tmp.0.join("one"), cache, 3);
    config.model.init_from = Some(start.run.out.clone());
    // AdamW's first step moves a parameter by up to lr whatever its gradient's size,
    // so float noise in near-zero gradients (the layouts sum in different orders)
    // becomes a weight difference of up to ~1e-5 at lr 1e-2 (measured between two
    // one-device runs differing only in that noise). At lr 1e-2 one device and SP2
    // then reported the same rewards but a 1% different KL from step 1 on, as a
    // flipped top-p sample would give; at 1e-3 they agree.
    config.optim.lr = 1e-3;
    let device = Device::flex().autodiff();
    let one = train_grpo_with(&config, &no_progress(), &device, &mut |_| {}, &Digits).unwrap();

    let text = VlmConfig::debug().text;
    let head_dim = text.head_dim();
    let heads = Heads {
        head_dim,
        q_heads: text.num_heads,
        kv_heads: text.num_kv_heads,
    };
    for sp in [2, 4] {
        let mut split = config.clone();
        split.run.out = tmp.0.join(format!("sp{sp}"));
        let comms = LocalWorld::communicators(sp);
        let summaries: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = comms
                .into_iter()
                .map(|comm| {
                    let split = &split;
                    scope.spawn(move || {
                        let _rank = comm.rank();
                        // SP4 runs LongVILA's 2D attention (prefill and log-prob
                        // passes) and its actor pass recomputes its layers (the
                        // scheme's backward replayed from the kept output and LSE);
                        // SP2 the zigzag ring with one autodiff graph.
                        let (scheme, recompute) = match sp {
                            4 => (
                                SpScheme::TwoD { ulysses: 2 },
                                longview_train::remat::Recompute::AttentionAware,
                            ),
                            _ => (SpScheme::ZigzagRing, longview_train::remat::Recompute::None),
                        };
                        let passes = SpPasses::with_scheme(&comm, heads, scheme)
                            .unwrap()
                            .with_recompute(recompute);
                        // SP2 shards AdamW's moments over its ranks (ZeRO-1).
                        let runner = MmSp::new(comm, sp, head_dim)
                            .unwrap()
                            .with_sharded_optimizer(sp == 2);
                        let device = Device::flex().autodiff();
                        train_grpo_on(
                            split,
                            &no_progress(),
                            &device,
                            &mut |_| {},
                            &Digits,
                            &runner,
                            &passes,
                        )
                        .unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (rank, summary) in summaries.iter().enumerate() {
            assert_eq!(summary.reports.len(), one.reports.len());
            for (step, (a, b)) in summary.reports.iter().zip(&one.reports).enumerate() {
                // Same samples, rewards and advantages; losses and KL equal up to the
                // float rounding of the ring's merge order.
                assert_eq!(
                    a.reward_mean, b.reward_mean,
                    "SP{sp} rank {rank} step {step}"
                );
                assert!(
                    (a.loss - b.loss).abs() < 1e-4,
                    "SP{sp} rank {rank} step {step}: loss {} vs {}",
                    a.loss,
                    b.loss
                );
                assert!(
                    (a.kl - b.kl).abs() < 1e-4,
                    "SP{sp} rank {rank} step {step}: kl {} vs {}",
                    a.kl,
                    b.kl
                );
                assert!(a.logprob_mismatch < 1e-4);
            }
        }
    }
}

/// One device runs a group's prompt once and its responses as a batch over the
/// prompt's keys (`grpo::shared_prefix`), in every recompute mode; the reference is
/// the plain layout: prompt + response, G times, under plain autodiff
/// (`response_logprobs`). Log-probs, loss and every gradient agree.
#[test]
fn shared_prefix_passes_equal_the_whole_sequences() {
    use longview_train::grpo::actor::actor_grads_plain;
    use longview_train::grpo::passes::{OneDevice, Passes};
    use longview_train::remat::Recompute;

    let _serial = serial();
    let case = ActorCase::new(9);
    let (model, device) = (&case.model, &case.device);
    let inner = device.clone().inner();
    // Responses of 4, 1 and 2 tokens (padding inside the batch), and a group whose
    // responses all have one token (no response rows run through the layers).
    let short = vec![vec![30], vec![31]];
    for responses in [&case.responses, &short] {
        let rollout = Rollout {
            responses,
            ..case.rollout()
        };
        let plain = model.valid();
        let visual = case.visual.clone().inner();
        let plain_rollout = Rollout {
            visual: Some(&visual),
            ..rollout
        };
        let whole = response_logprobs(&plain, &plain_rollout, &inner)
            .unwrap()
            .unwrap();
        let shared = OneDevice::default()
            .whole_logprobs(&plain, &plain_rollout, &inner)
            .unwrap()
            .unwrap();
        let (a, b) = (host(whole.logp), host(shared));
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        // f32 on the CPU; the attention sums the same keys in other groupings.
        assert!(worst < 1e-5, "log-probs differ by {worst}: {a:?} vs {b:?}");

        let mut loss_of = nonlinear_loss;
        let (reference_stats, reference) = actor_grads_plain(
            model,
            response_logprobs(model, &rollout, device).unwrap(),
            &mut loss_of,
        )
        .unwrap()
        .unwrap();
        for mode in [
            Recompute::None,
            Recompute::Layers,
            Recompute::AttentionAware,
        ] {
            let (stats, grads) = OneDevice { recompute: mode }
                .actor_grads(model, &rollout, device, &mut loss_of)
                .unwrap()
                .unwrap();
            assert!(
                (stats[0] - reference_stats[0]).abs() <= 1e-5 * reference_stats[0].abs().max(1.0),
                "{mode}: loss {} vs {}",
                stats[0],
                reference_stats[0]
            );
            let compared = assert_grads_close(model, &grads, &reference, 1e-4, &mode.to_string());
            // Every LLM parameter (the vision tower and projector get none: cached tokens).
            assert!(compared > 10, "{mode}: {compared} gradients compared");
        }
    }
}

/// One optimizer step per rollout batch takes the old policy's log-probs from the
/// actor's own pass (`exp(logp - sg(logp))`, no separate pass): the gradients equal
/// those with the old log-probs from a separate untracked pass, KL term included.
#[test]
fn the_actors_own_log_probs_serve_as_the_old_policys() {
    use burn::tensor::TensorData;
    use longview_train::grpo::actor::actor_grads_plain;
    use longview_train::grpo::logprobs::ResponseLogprobs;
    use longview_train::grpo::loss::{LossSettings, masked_sum, token_losses};
    use longview_train::grpo::shared_prefix::shared_prefix_logprobs;

    let _serial = serial();
    let case = ActorCase::new(9);
    let (model, device) = (&case.model, &case.device);
    let rollout = case.rollout();
    let inner = device.clone().inner();
    let visual = case.visual.clone().inner();
    let untracked = Rollout {
        visual: Some(&visual),
        ..rollout
    };
    let old = shared_prefix_logprobs(&model.valid(), &untracked, &inner)
        .unwrap()
        .unwrap()
        .logp;
    // A reference a little away from the policy, so the KL term has a gradient.
    let reference = old.clone().add_scalar(0.05);
    let advantages = Tensor::<1>::from_data(TensorData::new(vec![0.5f32, -1.0, 0.7], [3]), device);
    let settings = LossSettings {
        clip_low: 0.2,
        clip_high: 0.3,
        dual_clip: 3.0,
        kl_coef: 0.01,
    };
    let grads = |separate: bool| {
        let mut loss_of = |actor: ResponseLogprobs| {
            let old = match separate {
                true => old.clone().autodiff(),
                false => actor.logp.clone().detach(),
            };
            let losses = token_losses(
                actor.logp,
                old,
                Some(reference.clone().autodiff()),
                advantages.clone(),
                &settings,
            );
            Ok((masked_sum(losses.loss, actor.mask), vec![0.0]))
        };
        let actor = shared_prefix_logprobs(model, &rollout, device).unwrap();
        actor_grads_plain(model, actor, &mut loss_of)
            .unwrap()
            .unwrap()
            .1
    };
    let (separate, own) = (grads(true), grads(false));
    // f32; the two passes' log-probs agree to float rounding, so the ratio is 1 in
    // both up to that.
    let compared = assert_grads_close(model, &own, &separate, 1e-5, "own log-probs");
    assert!(compared > 10, "{compared} gradients compared");
}
