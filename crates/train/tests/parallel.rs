//! MM-SP + data parallelism on the in-process communicator: the same 10 steps give the
//! same loss curve on 1 device, SP 2, SP 4 and DP 2 x SP 2 (and the MM-SP code path
//! itself at 1 x 1), also with activation recomputation inside the MM-SP step.

use std::path::Path;

use burn::tensor::Device;
use longview_comm::LocalWorld;
use longview_data::TextTokenizer;
use longview_parallel::inference::{Heads, SpScheme};
use longview_train::mmsp::MmSp;
use longview_train::remat::Recompute;
use longview_train::trainer::{model_config, train_with};
use longview_train::{TrainConfig, TrainError, TrainOptions, TrainSummary, train};

mod common;
use common::{TempDir, no_progress, serial};

fn config(out: &Path, cache: &Path) -> TrainConfig {
    let mut config = TrainConfig::default();
    // Every layout starts from the same saved weights (see `initial_model`).
    config.model.init_from = Some(cache.join("initial-model"));
    config.run.out = out.into();
    config.run.steps = 10;
    config.run.batch_size = 4;
    config.run.grad_accum = 2;
    config.run.checkpoint_every = 10;
    config.optim.warmup_steps = 2;
    config.optim.clip_grad_norm = 1.0;
    config.data.frames = 6;
    config.data.min_frames = 3;
    config.data.needle_copies = 1;
    config.data.eval_per_depth = 0;
    config.data.cache = Some(cache.into());
    config
}

/// Stage 4 on text: LoRA adapters, a new RoPE base, text-only batches (no frames).
fn text_config(out: &Path, cache: &Path) -> TrainConfig {
    let mut config = config(out, cache);
    config.run.steps = 6;
    config.run.checkpoint_every = 6;
    config.model.stage = longview_train::Stage::ContextExtension;
    config.model.lora_rank = 4;
    config.model.rope_theta = Some(100_000.0);
    config.data.kind = longview_train::config::DataKind::Text;
    config.data.path = Some(cache.join("text.jsonl"));
    config.data.max_tokens = 37;
    config
}

/// A random debug VLM saved in VILA layout with the debug tokenizer.
fn initial_model(dir: &Path) {
    use longview_models::hf::checkpoint::{SaveOptions, save_vila};
    let tokenizer = TextTokenizer::debug();
    let vlm = model_config(&TrainConfig::default(), &tokenizer).unwrap();
    let device = Device::flex();
    device.seed(11);
    let options = SaveOptions {
        dtype: burn::tensor::DType::F32,
        max_shard_bytes: None,
    };
    save_vila(&vlm.init(&device), &vlm, dir, options).unwrap();
    std::fs::write(
        dir.join("llm/tokenizer.json"),
        tokenizer.inner().to_string(false).unwrap(),
    )
    .unwrap();
}

/// The loss curve of `config` on `dp x sp` in-process ranks (its `run.recompute` in
/// the MM-SP step).
fn parallel_losses(config: &TrainConfig, dp: usize, sp: usize) -> Vec<f32> {
    let mut results: Vec<Vec<f32>> = parallel_runs(config, dp, sp)
        .into_iter()
        .map(|summary| summary.losses)
        .collect();
    // Every rank saw the same (all-reduced) loss.
    for other in &results[1..] {
        assert_eq!(other, &results[0]);
    }
    results.swap_remove(0)
}

/// `losses` equal the single-device `reference` step for step within 1e-5
/// (relative): the layouts only reorder f32 sums (observed ~1e-7).
fn assert_same_curve(reference: &[f32], losses: &[f32], what: &str) {
    assert_eq!(losses.len(), reference.len(), "{what}: steps");
    for (step, (a, b)) in reference.iter().zip(losses).enumerate() {
        assert!(
            (a - b).abs() <= 1e-5 * a.abs(),
            "{what}, step {}: single device {a} vs {b}",
            step + 1
        );
    }
}

/// `config` trained on one device under `options`.
fn one_device(config: &TrainConfig, options: &TrainOptions) -> TrainSummary {
    train(
        config,
        options,
        &Device::flex().autodiff(),
        &mut |_: &str| {},
    )
    .unwrap()
}

/// Every rank's summary of `config` on `dp x sp` in-process ranks, rank 0 first.
fn parallel_runs(config: &TrainConfig, dp: usize, sp: usize) -> Vec<TrainSummary> {
    parallel_results(config, dp, sp, &no_progress())
        .into_iter()
        .map(Result::unwrap)
        .collect()
}

/// Every rank's result of `config` under `options` on `dp x sp` in-process ranks
/// (its `run.recompute` and `run.shard_optimizer`), rank 0 first.
fn parallel_results(
    config: &TrainConfig,
    dp: usize,
    sp: usize,
    options: &TrainOptions,
) -> Vec<Result<TrainSummary, TrainError>> {
    let text = model_config(config, &TextTokenizer::debug()).unwrap().text;
    let heads = Heads {
        head_dim: text.head_dim(),
        q_heads: text.num_heads,
        kv_heads: text.num_kv_heads,
    };
    let comms = LocalWorld::communicators(dp * sp);
    std::thread::scope(|scope| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                scope.spawn(move || {
                    let runner = MmSp::new(comm, sp, heads.head_dim)
                        .unwrap()
                        .with_scheme(heads, config.run.sp_scheme)
                        .unwrap()
                        .with_recompute(config.run.recompute)
                        .with_sharded_optimizer(config.run.shard_optimizer);
                    let device = Device::flex().autodiff();
                    train_with(config, options, &device, &mut |_: &str| {}, &runner)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank panicked"))
            .collect::<Vec<_>>()
    })
}

#[test]
fn temporal_pooling_under_mm_sp_repeats_the_single_device_loss_curve() {
    // Pairs of frames averaged: haystacks of 3 frames are padded to 4 by the sample
    // encoder, and every rank's share of a micro-batch's frames holds whole pairs.
    let _serial = serial();
    let tmp = TempDir::new("mmsp-temporal");
    let cache = tmp.0.join("cache");
    initial_model(&cache.join("initial-model"));
    let pooled = |name: &str| {
        let mut config = config(&tmp.0.join(name), &cache);
        config.run.steps = 4;
        config.run.checkpoint_every = 4;
        config.model.temporal_pool = Some(2);
        config
    };
    let reference = one_device(&pooled("single"), &no_progress()).losses;
    for (dp, sp) in [(1, 2), (1, 4)] {
        let losses = parallel_losses(&pooled(&format!("dp{dp}-sp{sp}")), dp, sp);
        assert_same_curve(&reference, &losses, &format!("dp {dp} x sp {sp}"));
    }
}

#[test]
fn the_writer_scores_held_out_needles_alone_under_mm_sp() {
    // The writer scores the held-out videos by itself, every `eval_every` steps and
    // after the last; the model's LLM layers run sharded attention in the step, so
    // the scoring copy must use one device's (it panicked: no sequence-parallel
    // attention is installed for a lone rank's call).
    let _serial = serial();
    let tmp = TempDir::new("mmsp-eval");
    let cache = tmp.0.join("cache");
    initial_model(&cache.join("initial-model"));
    let with_eval = |name: &str| {
        let mut config = config(&tmp.0.join(name), &cache);
        config.run.steps = 4;
        config.run.checkpoint_every = 4;
        config.run.eval_every = 2;
        config.data.eval_per_depth = 1;
        config
    };
    let single = one_device(&with_eval("single"), &no_progress());
    let want = single.eval.expect("the single-device run scores");
    let summaries = parallel_runs(&with_eval("sp2"), 1, 2);
    let got = summaries[0].eval.as_ref().expect("the writer scores");
    assert!(got.total > 0);
    // The same weights up to f32 rounding: the same greedy answers.
    assert_eq!((got.correct, got.total), (want.correct, want.total));
    assert!(summaries[1].eval.is_none(), "only the writer scores");
}

#[test]
fn mm_sp_and_data_parallel_layouts_repeat_the_single_device_loss_curve() {
    let _serial = serial();
    let tmp = TempDir::new("mmsp");
    let cache = tmp.0.join("cache");
    initial_model(&cache.join("initial-model"));
    let options = no_progress();
    let reference = one_device(&config(&tmp.0.join("single"), &cache), &options).losses;
    assert_eq!(reference.len(), 10);
    assert!(reference[9] < reference[0], "the loss falls: {reference:?}");
    for (dp, sp) in [(1, 1), (2, 1), (1, 2), (1, 4), (2, 2)] {
        let losses = parallel_losses(
            &config(&tmp.0.join(format!("dp{dp}-sp{sp}")), &cache),
            dp,
            sp,
        );
        println!("dp {dp} x sp {sp}: {losses:?}");
        assert_eq!(losses.len(), 10);
        assert_same_curve(&reference, &losses, &format!("dp {dp} x sp {sp}"));
    }
}

#[test]
fn stage4_text_batches_under_mm_sp_repeat_the_single_device_loss_curve() {
    let _serial = serial();
    let tmp = TempDir::new("mmsp-text");
    let cache = tmp.0.join("cache");
    initial_model(&cache.join("initial-model"));
    let docs: Vec<String> = (0..16)
        .map(|i| {
            format!(
                "{{\"text\": \"note {i}: frames, tokens and rings, {} of them\"}}",
                i * 3
            )
        })
        .collect();
    std::fs::write(cache.join("text.jsonl"), docs.join("\n")).unwrap();
    let options = no_progress();
    let reference = one_device(&text_config(&tmp.0.join("single"), &cache), &options).losses;
    assert_eq!(reference.len(), 6);
    for (mode, dp, sp) in [
        (Recompute::None, 1, 2),
        (Recompute::None, 2, 2),
        (Recompute::AttentionAware, 1, 2),
    ] {
        let mut run = text_config(&tmp.0.join(format!("{mode}-dp{dp}-sp{sp}")), &cache);
        run.run.recompute = mode;
        let losses = parallel_losses(&run, dp, sp);
        println!("text, {mode}, dp {dp} x sp {sp}: {losses:?}");
        assert_same_curve(
            &reference,
            &losses,
            &format!("text, {mode}, dp {dp} x sp {sp}"),
        );
    }
    // LoRA with the moments sharded over DP 2 x SP 2 (the frozen weights own none):
    // stopped after 3 steps and resumed, the single-device curve.
    let mut run = text_config(&tmp.0.join("lora-sharded"), &cache);
    run.run.shard_optimizer = true;
    run.run.checkpoint_every = 3;
    let first = TrainOptions {
        stop_after: Some(3),
        ..no_progress()
    };
    let head = parallel_results(&run, 2, 2, &first)
        .remove(0)
        .unwrap()
        .losses;
    let resumed = TrainOptions {
        resume: true,
        ..no_progress()
    };
    let tail = parallel_results(&run, 2, 2, &resumed)
        .remove(0)
        .unwrap()
        .losses;
    assert_eq!(head.len(), 3);
    assert_same_curve(&reference, &tail, "text, LoRA, sharded moments, resumed");
}

#[test]
fn recomputation_inside_mm_sp_repeats_the_single_device_loss_curve() {
    let _serial = serial();
    let tmp = TempDir::new("mmsp-remat");
    let cache = tmp.0.join("cache");
    initial_model(&cache.join("initial-model"));
    let options = no_progress();
    // Plain autodiff on one device.
    let reference = one_device(&config(&tmp.0.join("single"), &cache), &options).losses;
    assert_eq!(reference.len(), 10);
    for (mode, dp, sp) in [
        (Recompute::AttentionAware, 1, 1),
        (Recompute::AttentionAware, 1, 2),
        (Recompute::AttentionAware, 1, 4),
        (Recompute::AttentionAware, 2, 2),
        (Recompute::Layers, 1, 2),
    ] {
        let mut run = config(&tmp.0.join(format!("{mode}-dp{dp}-sp{sp}")), &cache);
        run.run.recompute = mode;
        let losses = parallel_losses(&run, dp, sp);
        println!("{mode}, dp {dp} x sp {sp}: {losses:?}");
        assert_eq!(losses.len(), 10);
        assert_same_curve(&reference, &losses, &format!("{mode}, dp {dp} x sp {sp}"));
    }
}

#[test]
fn layouts_from_random_weights_repeat_the_single_device_curve_and_themselves() {
    let _serial = serial();
    let tmp = TempDir::new("mmsp-rand");
    let cache = tmp.0.join("cache");
    let random = |out: &str| {
        let mut c = config(&tmp.0.join(out), &cache);
        c.model.init_from = None;
        c.run.steps = 4;
        c.run.checkpoint_every = 4;
        c
    };
    let options = no_progress();
    let reference = one_device(&random("single"), &options).losses;
    let first = parallel_losses(&random("sp2-a"), 1, 2);
    let again = parallel_losses(&random("sp2-b"), 1, 2);
    assert_eq!(first, again, "two SP2 runs from the same seed");
    let dp2sp2 = parallel_losses(&random("dp2-sp2"), 2, 2);
    for (name, losses) in [("SP2", &first), ("DP2xSP2", &dp2sp2)] {
        assert_same_curve(&reference, losses, name);
    }
}

/// ZeRO-1 of the moments (`run.shard_optimizer`) on DP 2 and DP 2 x SP 2: the same
/// loss curve as the unsharded layout (the owner's AdamW update is the same
/// arithmetic), checkpoints of one shard per rank that together hold the whole state,
/// an interrupted run that resumes to the uninterrupted curve, and clear refusals of
/// another layout.
#[test]
fn sharded_optimizer_repeats_the_unsharded_run_and_resumes() {
    let _serial = serial();
    let tmp = TempDir::new("zero");
    let cache = tmp.0.join("cache");
    initial_model(&cache.join("initial-model"));
    let setup = |name: &str, shard: bool| {
        let mut config = config(&tmp.0.join(name), &cache);
        config.run.steps = 4;
        config.run.checkpoint_every = 2;
        config.run.shard_optimizer = shard;
        config
    };
    for (dp, sp) in [(2, 1), (2, 2)] {
        let layout = format!("dp {dp} x sp {sp}");
        let whole = parallel_losses(&setup(&format!("whole-{dp}x{sp}"), false), dp, sp);
        let sharded_config = setup(&format!("sharded-{dp}x{sp}"), true);
        let sharded = parallel_losses(&sharded_config, dp, sp);
        assert_same_curve(&whole, &sharded, &format!("{layout}, sharded"));

        // One file of moments per rank, which together hold the whole state.
        let world = dp * sp;
        let checkpoint = |config: &TrainConfig, step: usize| {
            config.run.out.join(format!("checkpoints/step-{step:06}"))
        };
        let dir = checkpoint(&sharded_config, 4);
        assert!(!dir.join("optimizer.bpk").exists(), "{layout}");
        let size = |p: std::path::PathBuf| {
            std::fs::metadata(&p)
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
                .len()
        };
        let shards: Vec<u64> = (0..world)
            .map(|r| {
                assert!(
                    dir.join(format!("param_ids-{r:03}-of-{world:03}.json"))
                        .is_file()
                );
                size(dir.join(format!("optimizer-{r:03}-of-{world:03}.bpk")))
            })
            .collect();
        let full =
            size(checkpoint(&setup(&format!("whole-{dp}x{sp}"), false), 4).join("optimizer.bpk"));
        let total: u64 = shards.iter().sum();
        // The same tensors; the files' headers and per-parameter scalars differ.
        assert!(
            total.abs_diff(full) < full / 20,
            "{layout}: shards {shards:?} vs one file of {full} bytes"
        );
        for &s in &shards {
            assert!(s < full * 3 / 4, "{layout}: a shard of {s} bytes of {full}");
        }
        let staged = std::fs::read_dir(dir.parent().unwrap())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".shards")
            })
            .count();
        assert_eq!(staged, 0, "{layout}: staging folders left behind");

        // Stopped after 2 steps, resumed to 4: the uninterrupted curve.
        let split = setup(&format!("split-{dp}x{sp}"), true);
        let first = TrainOptions {
            stop_after: Some(2),
            ..no_progress()
        };
        let head: Vec<f32> = parallel_results(&split, dp, sp, &first)
            .remove(0)
            .unwrap()
            .losses;
        let resumed = TrainOptions {
            resume: true,
            ..no_progress()
        };
        let tail = parallel_results(&split, dp, sp, &resumed)
            .remove(0)
            .unwrap()
            .losses;
        assert_eq!(tail, sharded, "{layout}: resumed curve");
        assert_eq!(head, sharded[..2], "{layout}: first half");
    }

    // Another layout is refused, naming the counts.
    let split = setup("split-2x1", true);
    let err = train(
        &split,
        &TrainOptions {
            resume: true,
            ..no_progress()
        },
        &Device::flex().autodiff(),
        &mut |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("2 shards") && err.contains("resume on 2 ranks"),
        "{err}"
    );
    let whole = setup("whole-2x1", false);
    let sharded_resume = TrainConfig {
        run: longview_train::RunConfig {
            shard_optimizer: true,
            ..whole.run.clone()
        },
        ..whole.clone()
    };
    let resumed = TrainOptions {
        resume: true,
        allow_config_change: true,
        ..no_progress()
    };
    for result in parallel_results(&sharded_resume, 2, 1, &resumed) {
        let err = result.unwrap_err().to_string();
        assert!(
            err.contains("one file") && err.contains("shard_optimizer = false"),
            "{err}"
        );
    }
}

/// MM-SP with Ulysses and LongVILA's 2D attention in place of the zigzag ring
/// (`run.sp_scheme`), each in its own token layout, also under attention-aware
/// recomputation (the replay runs the scheme's distributed backward): the
/// single-device loss curve within 1e-5.
#[test]
fn ulysses_and_2d_attention_under_mm_sp_repeat_the_single_device_loss_curve() {
    let _serial = serial();
    let tmp = TempDir::new("mmsp-schemes");
    let cache = tmp.0.join("cache");
    initial_model(&cache.join("initial-model"));
    let setup = |name: &str| {
        let mut config = config(&tmp.0.join(name), &cache);
        config.run.steps = 4;
        config.run.checkpoint_every = 4;
        config
    };
    let reference = one_device(&setup("single"), &no_progress()).losses;
    let cases = [
        (SpScheme::Ulysses, 1, 2, Recompute::None),
        (SpScheme::Ulysses, 1, 4, Recompute::AttentionAware),
        (SpScheme::TwoD { ulysses: 2 }, 1, 4, Recompute::None),
        (
            SpScheme::TwoD { ulysses: 2 },
            1,
            4,
            Recompute::AttentionAware,
        ),
        (SpScheme::Ulysses, 2, 2, Recompute::Layers),
    ];
    for (scheme, dp, sp, recompute) in cases {
        let what = format!("{scheme} dp {dp} x sp {sp}, {recompute}");
        let mut config = setup(&what.replace([' ', ',', ':'], "-"));
        config.run.sp_scheme = scheme;
        config.run.recompute = recompute;
        let losses = parallel_losses(&config, dp, sp);
        assert_same_curve(&reference, &losses, &what);
    }
    // A degree the heads do not allow (4 query / 2 key-value heads) is refused.
    let mut config = setup("ulysses-3");
    config.run.sp_scheme = SpScheme::Ulysses;
    let text = model_config(&config, &TextTokenizer::debug()).unwrap().text;
    let heads = Heads {
        head_dim: text.head_dim(),
        q_heads: text.num_heads,
        kv_heads: text.num_kv_heads,
    };
    let errors: Vec<String> = std::thread::scope(|scope| {
        LocalWorld::communicators(3)
            .into_iter()
            .map(|comm| {
                scope.spawn(move || {
                    match MmSp::new(comm, 3, heads.head_dim)
                        .unwrap()
                        .with_scheme(heads, SpScheme::Ulysses)
                    {
                        Ok(_) => String::new(),
                        Err(e) => e.to_string(),
                    }
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect()
    });
    for e in errors {
        assert!(
            e.contains("run.sp_scheme = \"ulysses\" over 3 ranks") && e.contains("4 query heads"),
            "{e}"
        );
    }
}
