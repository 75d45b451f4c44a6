//! Training-loop tests on the CPU backend: interrupted-and-resumed runs equal
//! uninterrupted ones, checkpoints survive crashes, configs fail with the key named,
//! clipping and the schedule do what they promise, and needle scoring reads the right
//! positions.

use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor};
use longview_data::TextTokenizer;
use longview_models::VlmConfig;
use longview_models::vila::causal_lm_loss_sum;
use longview_train::data::{Encoder, collate, haystack};
use longview_train::remat::Recompute;
use longview_train::trainer::{global_grad_norm, model_config, scale_grads};
use longview_train::{OptimConfig, TrainConfig, TrainError, TrainOptions, learning_rate, train};

/// Burn's device RNG is one per process and model parameters are drawn lazily, on
/// first use: two trainers initialising at once in one process (tests run on several
/// threads) interleave their draws, and the same seed then gives different weights.
/// A training run is one process in real use; here every test takes this lock.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("longview-train-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn device() -> Device {
    Device::flex().autodiff()
}

/// A run small enough for a unit test: 8-frame videos, 6 of them, 2 micro-batches of 2.
fn tiny(out: &Path, cache: &Path) -> TrainConfig {
    let mut config = TrainConfig::default();
    config.run.out = out.into();
    config.run.steps = 6;
    config.run.batch_size = 2;
    config.run.grad_accum = 2;
    config.run.checkpoint_every = 2;
    config.run.keep_checkpoints = 2;
    config.optim.warmup_steps = 2;
    config.optim.clip_grad_norm = 0.5;
    config.data.frames = 8;
    config.data.min_frames = 4;
    config.data.needle_copies = 1;
    config.data.eval_per_depth = 1;
    config.data.cache = Some(cache.into());
    config
}

fn quiet() -> impl FnMut(&str) {
    |_: &str| {}
}

#[test]
fn a_resumed_run_repeats_the_uninterrupted_loss_curve() {
    let _serial = serial();
    let tmp = TempDir::new("resume");
    let cache = tmp.0.join("cache");
    let options = TrainOptions {
        progress: false,
        ..TrainOptions::default()
    };

    let whole = tiny(&tmp.0.join("whole"), &cache);
    let straight = train(&whole, &options, &device(), &mut quiet()).unwrap();
    assert_eq!(straight.losses.len(), 6);
    assert!(straight.losses.iter().all(|l| l.is_finite()));

    // Stop after 3 steps (a checkpoint is written at the stop), then resume twice:
    // once with an unfinished checkpoint lying around as a crash would leave it.
    let split = tiny(&tmp.0.join("split"), &cache);
    let first = train(
        &split,
        &TrainOptions {
            stop_after: Some(3),
            ..options.clone()
        },
        &device(),
        &mut quiet(),
    )
    .unwrap();
    assert_eq!(first.last_step, 3);
    let partial = split.run.out.join("checkpoints/.step-000004.partial");
    std::fs::create_dir_all(partial.join("model")).unwrap();
    std::fs::write(partial.join("trainer.json"), "{ truncated").unwrap();

    let err = train(&split, &options, &device(), &mut quiet()).unwrap_err();
    assert!(
        err.to_string().contains("--resume"),
        "a second run into a folder with checkpoints must ask for --resume: {err}"
    );
    assert!(
        !partial.exists(),
        "the crashed run's partial checkpoint is removed"
    );

    let mut logs = Vec::new();
    let resumed = train(
        &split,
        &TrainOptions {
            resume: true,
            ..options.clone()
        },
        &device(),
        &mut |l: &str| logs.push(l.to_string()),
    )
    .unwrap();
    assert!(
        logs.iter()
            .any(|l| l.contains("resuming") && l.contains("step 3")),
        "{logs:?}"
    );
    assert_eq!(resumed.first_step, 3);
    assert_eq!(resumed.losses.len(), 6);
    for (step, (a, b)) in straight.losses.iter().zip(&resumed.losses).enumerate() {
        assert!(
            (a - b).abs() <= 1e-6 * a.abs().max(1.0),
            "step {}: uninterrupted {a} vs resumed {b}",
            step + 1
        );
    }
    // The metrics file is one curve of 6 steps.
    let metrics = std::fs::read_to_string(split.run.out.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = metrics
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4, 5, 6]);
    // One TensorBoard event file per invocation that trained.
    let event_files = std::fs::read_dir(split.run.out.join("tensorboard"))
        .unwrap()
        .filter(|e| {
            let e = e.as_ref().unwrap();
            e.file_name()
                .to_string_lossy()
                .starts_with("events.out.tfevents.")
                && e.metadata().unwrap().len() > 0
        })
        .count();
    assert_eq!(event_files, 2, "one event file per training invocation");
    // Only the newest two checkpoints are kept, and `latest` names the last.
    let mut kept: Vec<String> = std::fs::read_dir(split.run.out.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    kept.sort();
    assert_eq!(kept, vec!["step-000004", "step-000006"]);
    let latest = std::fs::read_to_string(split.run.out.join("checkpoints/latest")).unwrap();
    assert_eq!(latest.trim(), "step-000006");
    // The held-out set was scored at the end: 6 depths x 1 video.
    let report = resumed.eval.expect("scored at the last step");
    assert_eq!(report.total, 6);
    assert_eq!(report.per_depth.len(), 6);

    // `latest` pointing at a missing folder is an error naming it, not a fresh start.
    std::fs::write(split.run.out.join("checkpoints/latest"), "step-000099").unwrap();
    let err = train(
        &split,
        &TrainOptions {
            resume: true,
            ..options.clone()
        },
        &device(),
        &mut quiet(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("step-000099"), "{err}");
}

#[test]
fn recomputing_activations_keeps_the_loss_curve() {
    let _serial = serial();
    let tmp = TempDir::new("recompute");
    let cache = tmp.0.join("cache");
    let options = TrainOptions {
        progress: false,
        ..TrainOptions::default()
    };
    let mut curves = Vec::new();
    for mode in [
        Recompute::None,
        Recompute::Layers,
        Recompute::AttentionAware,
    ] {
        let mut config = tiny(&tmp.0.join(mode.to_string()), &cache);
        config.run.steps = 4;
        config.run.recompute = mode;
        let summary = train(&config, &options, &device(), &mut quiet()).unwrap();
        curves.push((mode, summary.losses));
    }
    let (_, want) = &curves[0];
    assert_eq!(want.len(), 4);
    for (mode, got) in &curves[1..] {
        for (step, (a, b)) in got.iter().zip(want).enumerate() {
            // f32 on the CPU: the same arithmetic in another order (summation of the
            // loss over supervised rows, gradients per segment), over 4 AdamW steps.
            assert!(
                (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                "{mode}, step {}: {a} vs {b} without recomputation",
                step + 1
            );
        }
    }
}

#[test]
fn configs_fail_with_the_key_and_value_named() {
    let _serial = serial();
    let cases = [
        ("[optim]\nlr = -1.0\n", "optim.lr"),
        ("[run]\nsteps = 0\n", "run.steps"),
        ("[run]\nbatch_size = 0\n", "run.batch_size"),
        ("[optim]\nwarmup_steps = 5000\n", "optim.warmup_steps"),
        ("[data]\nneedle_copies = 0\n", "data.needle_copies"),
        ("[data]\nkind = \"cot\"\n", "data.path"),
        ("[data]\npath = \"rows.jsonl\"\n", "data.path"),
        ("[model]\nsize = \"13b\"\n", "13b"),
        ("[model]\ntrainable = [\"llm\", \"llm-lora\"]\n", "keep one"),
        ("[model]\nrope_theta = 0.5\n", "model.rope_theta"),
        (
            "[data]\nkind = \"text\"\npath = \"t.jsonl\"\nmax_tokens = 1\n",
            "data.max_tokens",
        ),
        ("[model]\nstage = \"fine-tune\"\n", "fine-tune"),
        ("[model]\ntrainable = []\n", "model.trainable"),
        ("[data]\nwidth = 15\n", "data.width"),
        ("[run]\nstpes = 3\n", "stpes"),
        ("[optim]\nlr = \"fast\"\n", "lr"),
    ];
    for (text, needle) in cases {
        let err = TrainConfig::from_toml(text, "bad.toml").unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("bad.toml") && message.contains(needle),
            "{text:?}: expected the message to name `{needle}`: {message}"
        );
    }
    // Every shipped config parses.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut seen = 0;
    for entry in std::fs::read_dir(&root).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            TrainConfig::from_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            seen += 1;
        }
    }
    assert!(
        seen >= 5,
        "expected the stage configs in configs/, found {seen}"
    );
    let missing = TrainConfig::from_file("no/such/config.toml").unwrap_err();
    assert!(matches!(missing, TrainError::Io { .. }));
    assert!(missing.to_string().contains("no/such/config.toml"));
}

#[test]
fn the_schedule_warms_up_linearly_then_decays_by_cosine_to_the_floor() {
    let _serial = serial();
    let optim = OptimConfig {
        lr: 1e-3,
        warmup_steps: 10,
        min_lr_ratio: 0.1,
        ..OptimConfig::default()
    };
    let total = 110;
    for step in 0..10 {
        let expected = 1e-3 * (step + 1) as f64 / 10.0;
        assert!((learning_rate(&optim, step, total) - expected).abs() < 1e-15);
    }
    // Cosine over steps 10..=109 (99 intervals): peak, a middle step, floor.
    assert!((learning_rate(&optim, 10, total) - 1e-3).abs() < 1e-15);
    let mid = 1e-4 + 0.9e-3 * 0.5 * (1.0 + (std::f64::consts::PI * 49.0 / 99.0).cos());
    assert!((learning_rate(&optim, 59, total) - mid).abs() < 1e-12);
    // Exactly half-way between peak and floor lies at 49.5 intervals: between 59 and 60.
    let half = 1e-4 + 0.9e-3 * 0.5;
    assert!(learning_rate(&optim, 59, total) > half && learning_rate(&optim, 60, total) < half);
    assert!((learning_rate(&optim, 109, total) - 1e-4).abs() < 1e-15);
    for step in 10..109 {
        assert!(learning_rate(&optim, step + 1, total) <= learning_rate(&optim, step, total));
    }
}

/// Every gradient on the host, as f64.
fn host_grads<M: Module>(model: &M, grads: &GradientsParams) -> Vec<f64> {
    struct Collect<'a> {
        grads: &'a GradientsParams,
        out: Vec<f64>,
    }
    impl ModuleVisitor for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                let data = g.into_data().convert::<f32>();
                self.out
                    .extend(data.as_slice::<f32>().unwrap().iter().map(|&x| x as f64));
            }
        }
    }
    let mut c = Collect {
        grads,
        out: Vec::new(),
    };
    model.visit(&mut c);
    c.out
}

/// Haystack samples at the debug VLM's 40x40 input.
fn encoder<'a>(tokenizer: &'a TextTokenizer, vlm: &'a VlmConfig) -> Encoder<'a> {
    Encoder {
        tokenizer,
        template: longview_data::ChatTemplate::qwen2(),
        model: vlm,
        width: 40,
        height: 40,
    }
}

#[test]
fn clipping_uses_the_global_norm_and_scaling_scales_every_gradient() {
    let _serial = serial();
    let tmp = TempDir::new("clip");
    let tokenizer = TextTokenizer::debug();
    let vlm = model_config(&TrainConfig::default(), &tokenizer).unwrap();
    let device = device();
    let model = vlm.init(&device);
    let encoder = encoder(&tokenizer, &vlm);
    let data = haystack(&encoder, &tmp.0, 4, 4, 2, 0, 7).unwrap();
    let samples = [
        data.train.sample(&encoder, 7, 0).unwrap(),
        data.train.sample(&encoder, 7, 1).unwrap(),
    ];
    let batch = collate(&[&samples[0], &samples[1]], &device);
    let (sum, count) = causal_lm_loss_sum(model.forward(batch.input).unwrap(), batch.labels);
    assert_eq!(count, batch.supervised);
    let mut grads = GradientsParams::from_grads(sum.backward(), &model);

    let host = host_grads(&model, &grads);
    let reference = host.iter().map(|g| g * g).sum::<f64>().sqrt();
    let norm = global_grad_norm(&model, &grads) as f64;
    assert!(
        (norm - reference).abs() <= 1e-4 * reference,
        "global norm {norm} vs host {reference}"
    );
    scale_grads(&model, &mut grads, 0.25);
    let scaled = host_grads(&model, &grads);
    assert_eq!(scaled.len(), host.len());
    for (a, b) in host.iter().zip(&scaled) {
        assert!((a * 0.25 - b).abs() <= 1e-6 * a.abs().max(1e-6));
    }
}

#[test]
fn training_samples_insert_exactly_one_needle_frame_deterministically() {
    let _serial = serial();
    use longview_data::synthetic::shows_needle;
    use longview_data::text::IGNORE_INDEX;
    let tmp = TempDir::new("insert");
    let tokenizer = TextTokenizer::debug();
    let vlm = model_config(&TrainConfig::default(), &tokenizer).unwrap();
    let encoder = encoder(&tokenizer, &vlm);
    let data = haystack(&encoder, &tmp.0, 8, 1, 1, 0, 5).unwrap();
    assert_eq!(data.train.lengths(), vec![1, 2, 4, 8]);
    assert_eq!(data.train.needle_frames(), 90);
    let (mut lengths, mut answers) = (Vec::new(), Vec::new());
    for i in 0..40 {
        let s = data.train.sample(&encoder, 5, i).unwrap();
        let again = data.train.sample(&encoder, 5, i).unwrap();
        assert_eq!(
            (&s.ids, &s.pixels),
            (&again.ids, &again.pixels),
            "sample {i}"
        );
        // Back to RGB bytes, then the data crate's detector: the needle is on exactly
        // one frame, the one `depth` names.
        let side = s.side;
        let needles: Vec<usize> = (0..s.frames)
            .filter(|&f| {
                let frame = &s.pixels[f * 3 * side * side..(f + 1) * 3 * side * side];
                let mut rgb = vec![0u8; 3 * side * side];
                for p in 0..side * side {
                    for c in 0..3 {
                        let x = frame[c * side * side + p];
                        rgb[3 * p + c] = ((x + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8;
                    }
                }
                shows_needle(&rgb, 3 * side, side, side)
            })
            .collect();
        let at = (s.depth * (s.frames.max(2) - 1) as f64).round() as usize;
        assert_eq!(needles, vec![at], "sample {i}: {} frames", s.frames);
        // The supervised tokens start with the answer's.
        let answer = tokenizer.encode(&s.answer).unwrap();
        let supervised: Vec<u32> = s
            .ids
            .iter()
            .zip(&s.labels)
            .filter(|(_, l)| **l != IGNORE_INDEX)
            .map(|(&t, _)| t)
            .collect();
        assert_eq!(&supervised[..answer.len()], &answer[..], "sample {i}");
        assert!((10..100).contains(&s.answer.parse::<u32>().unwrap()));
        lengths.push(s.frames);
        answers.push(s.answer.clone());
    }
    lengths.sort();
    lengths.dedup();
    answers.sort();
    answers.dedup();
    assert_eq!(lengths, vec![1, 2, 4, 8], "every haystack length is drawn");
    assert!(
        answers.len() > 20,
        "{} distinct answers in 40 samples",
        answers.len()
    );
    // Another seed is another stream.
    let other = data.train.sample(&encoder, 6, 0).unwrap();
    let first = data.train.sample(&encoder, 5, 0).unwrap();
    assert!(other.pixels != first.pixels || other.ids != first.ids);
}

#[test]
fn needle_scoring_reads_the_answer_positions() {
    let _serial = serial();
    let tmp = TempDir::new("needle");
    let tokenizer = TextTokenizer::debug();
    let vlm = model_config(&TrainConfig::default(), &tokenizer).unwrap();
    let device = device();
    let model = vlm.init(&device);
    let encoder = encoder(&tokenizer, &vlm);
    let data = haystack(&encoder, &tmp.0, 4, 4, 1, 1, 3).unwrap();
    assert_eq!(data.eval.len(), 6);
    let sample = &data.eval[2];
    // The answer's tokens follow the prompt and are supervised.
    let answer_ids = tokenizer.encode(&sample.answer).unwrap();
    assert_eq!(
        &sample.ids[sample.prompt_len..sample.prompt_len + answer_ids.len()],
        &answer_ids[..]
    );
    assert!(
        sample.labels[..sample.prompt_len]
            .iter()
            .all(|&l| l == -100)
    );

    // Reference: full logits on the host, argmax of rows prompt_len-1.. by hand.
    let batch = collate(&[sample], &device);
    let logits = model.forward(batch.input).unwrap();
    let [_, seq, vocab] = logits.dims();
    let host = logits.into_data().convert::<f32>();
    let host = host.as_slice::<f32>().unwrap();
    let mut expected = Vec::new();
    for k in 0..answer_ids.len() {
        let row = sample.prompt_len - 1 + k;
        assert!(row < seq);
        let slice = &host[row * vocab..(row + 1) * vocab];
        let best = (0..vocab)
            .max_by(|&a, &b| slice[a].total_cmp(&slice[b]).then(b.cmp(&a)))
            .unwrap();
        expected.push(best as u32);
    }
    let expected = tokenizer.decode(&expected, true).unwrap();
    // One pass, and chunked prefill with chunks that end inside the prompt, inside the
    // answer and on their boundary.
    for chunk in [0, 1, 7, sample.prompt_len - 1, sample.prompt_len] {
        let got = longview_train::needle::teacher_forced_answer(
            &model, sample, &tokenizer, chunk, &device,
        )
        .unwrap();
        assert_eq!(got, expected, "prefill chunk {chunk}");
    }
}

#[test]
fn tensorboard_events_match_tensorboards_own_writer() {
    let _serial = serial();
    // tests/fixtures/tensorboard_events.bin: TensorBoard 2.21's RecordWriter and protos
    // (make_tensorboard_fixture.py) for the same events.
    let tmp = TempDir::new("tensorboard");
    let path = tmp.0.join("events.out.tfevents.test");
    let mut writer =
        longview_train::tensorboard::EventWriter::create_at(&path, 1700000000.5).unwrap();
    writer.scalar("train/loss", 1, 2.5, 1700000001.25).unwrap();
    writer.scalar("train/lr", 1, 0.001, 1700000001.25).unwrap();
    writer.scalar("train/loss", 2, 1.75, 1700000002.0).unwrap();
    writer
        .scalar("eval/needle_accuracy", 300, 0.0, 1700000003.0)
        .unwrap();
    writer.session_start(301, 1700000004.0).unwrap();
    writer.flush().unwrap();
    let ours = std::fs::read(&path).unwrap();
    let reference = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tensorboard_events.bin"),
    )
    .unwrap();
    assert_eq!(ours.len(), reference.len());
    assert!(
        ours == reference,
        "event bytes differ from TensorBoard's writer"
    );
}

#[test]
fn multiple_choice_picks_the_option_letter_with_the_largest_logit() {
    let _serial = serial();
    use longview_data::dataset::{ReadOptions, read_multiple_choice};
    use longview_data::synthetic::{HaystackSpec, write_haystack_set};
    use longview_data::{DecodeOptions, Media, Message, Sampling};
    use longview_models::hf::checkpoint::{SaveOptions, save_vila};

    let tmp = TempDir::new("choice");
    let tokenizer = TextTokenizer::debug();
    let vlm = model_config(&TrainConfig::default(), &tokenizer).unwrap();
    let device = Device::flex();
    let model_dir = tmp.0.join("model");
    save_vila(&vlm.init(&device), &vlm, &model_dir, SaveOptions::default()).unwrap();
    std::fs::write(
        model_dir.join("llm/tokenizer.json"),
        tokenizer.inner().to_string(false).unwrap(),
    )
    .unwrap();
    let model = longview_train::eval::load(&model_dir, &device).unwrap();

    // VideoMME-style rows over generated videos.
    let spec = HaystackSpec {
        width: 40,
        height: 40,
        fps: 8,
        frames: 6,
        gop: 8,
        depths: vec![0.0, 0.5, 1.0],
        per_depth: 2,
        seed: 5,
    };
    let rows = write_haystack_set(tmp.0.join("videos"), &spec).unwrap();
    let jsonl: String = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "video": r.video, "question": r.question, "options": r.options,
                "answer": r.choice, "duration": if r.depth < 0.5 { "short" } else { "long" },
            })
            .to_string()
                + "\n"
        })
        .collect();
    let file = tmp.0.join("videos/choice.jsonl");
    std::fs::write(&file, jsonl).unwrap();
    let samples: Vec<_> = read_multiple_choice(&file, &ReadOptions::default())
        .unwrap()
        .samples()
        .cloned()
        .collect();
    assert_eq!(samples.len(), 6);

    let report =
        longview_train::eval::multiple_choice(&model, &samples, 6, &device, &mut |_: &str| {})
            .unwrap();
    assert_eq!(report.total, 6);
    let mut durations = report.per_duration.clone();
    durations.sort();
    assert_eq!(
        durations.iter().map(|d| d.2).collect::<Vec<_>>(),
        vec![4, 2],
        "long: depths 0.5 and 1.0, short: depth 0"
    );

    // Reference: the whole logit row on the host, letters looked up by their ids.
    let options = DecodeOptions::siglip(40);
    let mut correct = 0;
    for (sample, &chosen) in samples.iter().zip(&report.chosen) {
        let (_, b) =
            longview_data::decode_all(&sample.video, &Sampling::Uniform { count: 6 }, &options)
                .unwrap();
        let enc = longview_data::ChatTemplate::qwen2()
            .encode(
                &tokenizer,
                &[Message::user(sample.prompt())],
                &[Media::Video { frames: 6 }],
                vlm.tokens_per_frame(),
                true,
            )
            .unwrap();
        let len = enc.ids.len();
        let logits = model
            .model
            .forward(longview_models::VlmInput {
                input_ids: Tensor::<2, burn::tensor::Int>::from_data(
                    burn::tensor::TensorData::new(
                        enc.ids.iter().map(|&t| t as i64).collect(),
                        [1, len],
                    ),
                    &device,
                ),
                position_ids: longview_models::vila::default_position_ids(1, len, &device),
                visual: longview_models::VisualInput::Pixels(Tensor::from_data(
                    burn::tensor::TensorData::new(b.pixels, [6, 3, 40, 40]),
                    &device,
                )),
            })
            .unwrap();
        let vocab = logits.dims()[2];
        let data = logits.into_data().convert::<f32>();
        let row = &data.as_slice::<f32>().unwrap()[(len - 1) * vocab..len * vocab];
        let expected = ['A', 'B', 'C', 'D']
            .into_iter()
            .max_by(|a, b| {
                let score = |c: &char| row[tokenizer.token_id(&c.to_string()).unwrap() as usize];
                score(a).total_cmp(&score(b)).then(b.cmp(a))
            })
            .unwrap();
        assert_eq!(chosen, expected);
        correct += usize::from(expected == sample.answer);
    }
    assert_eq!(report.correct, correct);
}

#[test]
fn top_p_keeps_the_nucleus_and_samples_its_renormalised_probabilities() {
    let _serial = serial();
    use longview_train::generate::{Decoding, Sampler, argmax, nucleus};
    let probs = [0.05f64, 0.5, 0.15, 0.3];
    let logits: Vec<f32> = probs.iter().map(|p| (p.ln() + 3.0) as f32).collect();
    let close = |a: f64, b: f64| (a - b).abs() < 1e-6;

    // top-p 0.8: {1: .5, 3: .3} reach .8, renormalised to .625 / .375.
    let kept = nucleus(&logits, 0.8, 1.0);
    assert_eq!(kept.iter().map(|k| k.0).collect::<Vec<_>>(), vec![1, 3]);
    assert!(
        close(kept[0].1, 0.625) && close(kept[1].1, 0.375),
        "{kept:?}"
    );
    // top-p 1: everything, in order of probability.
    let all = nucleus(&logits, 1.0, 1.0);
    assert_eq!(
        all.iter().map(|k| k.0).collect::<Vec<_>>(),
        vec![1, 3, 2, 0]
    );
    for (id, p) in &all {
        assert!(close(*p, probs[*id as usize]), "{all:?}");
    }
    // Temperature 2: probabilities proportional to sqrt(p).
    let z: f64 = probs.iter().map(|p| p.sqrt()).sum();
    for (id, p) in nucleus(&logits, 1.0, 2.0) {
        assert!(close(p, probs[id as usize].sqrt() / z));
    }
    // A tiny top-p is greedy.
    assert_eq!(nucleus(&logits, 1e-9, 1.0), vec![(1, 1.0)]);
    assert_eq!(argmax(&logits), 1);
    let mut greedy = Sampler::new(Decoding::Greedy);
    assert_eq!(greedy.pick(&logits), 1);

    // Draw frequencies match the nucleus within 4 binomial standard deviations.
    let decoding = Decoding::TopP {
        top_p: 0.9,
        temperature: 1.0,
        seed: 11,
    };
    let mut sampler = Sampler::new(decoding);
    let n = 20_000;
    let mut counts = [0usize; 4];
    for _ in 0..n {
        counts[sampler.pick(&logits) as usize] += 1;
    }
    assert_eq!(counts[0], 0, "token 0 is outside the 0.9 nucleus");
    for (id, p) in nucleus(&logits, 0.9, 1.0) {
        let freq = counts[id as usize] as f64 / n as f64;
        let sd = (p * (1.0 - p) / n as f64).sqrt();
        assert!((freq - p).abs() < 4.0 * sd, "token {id}: {freq} vs {p}");
    }
    // The same seed draws the same tokens.
    let mut a = Sampler::new(decoding);
    let mut b = Sampler::new(decoding);
    assert!((0..50).all(|_| a.pick(&logits) == b.pick(&logits)));
    assert!(
        Decoding::TopP {
            top_p: 0.0,
            temperature: 1.0,
            seed: 0
        }
        .validate()
        .unwrap_err()
        .contains("top-p 0")
    );
}

#[test]
fn jsonl_conversations_and_cot_rows_train_with_answer_only_labels() {
    let _serial = serial();
    use longview_data::synthetic::{Needle, SyntheticVideo};
    use longview_data::text::IGNORE_INDEX;
    use longview_data::{DecodeOptions, Sampling, decode_all};
    use longview_train::config::DataKind;
    use longview_train::data::RowSet;

    let tmp = TempDir::new("jsonl");
    let dir = tmp.0.join("set");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, number) in [("a.mp4", "42"), ("b.mp4", "17")] {
        SyntheticVideo::new(40, 40, 8, 12, 4)
            .with_needles(vec![Needle {
                frame: 5,
                text: number.into(),
            }])
            .write(dir.join(name))
            .unwrap();
    }
    image::RgbImage::from_fn(64, 48, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 5) as u8, 90])
    })
    .save(dir.join("still.png"))
    .unwrap();
    let cot = dir.join("cot.jsonl");
    std::fs::write(
        &cot,
        [
            r#"{"videos": ["a.mp4"], "problem": "Which number is shown?", "answer": "<think>One frame shows 42.</think><answer>42</answer>"}"#,
            r#"{"video": "b.mp4", "problem": "Which number is shown?", "answer": "<think>I see 17.</think><answer>17</answer>"}"#,
            r#"{"videos": ["missing.mp4"], "problem": "?", "answer": "<answer>1</answer>"}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let conversations = dir.join("conversations.jsonl");
    std::fs::write(
        &conversations,
        [
            r#"{"id": "v", "video": "a.mp4", "conversations": [{"from": "human", "value": "<video>\nWhat is shown?"}, {"from": "gpt", "value": "The number 42."}]}"#,
            r#"{"id": "i", "image": "still.png", "conversations": [{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "A gradient."}]}"#,
        ]
        .join("\n"),
    )
    .unwrap();

    let tokenizer = TextTokenizer::debug();
    let vlm = model_config(&TrainConfig::default(), &tokenizer).unwrap();
    let encoder = encoder(&tokenizer, &vlm);
    let side = vlm.vision.image_size;

    // CoT rows: the missing video's row is skipped and reported with its line.
    let rows = RowSet::read(DataKind::Cot, &cot, 6).unwrap();
    assert_eq!(rows.len(), 2);
    assert!(
        rows.summary.contains("1 rows skipped") && rows.summary.contains("line 3"),
        "{}",
        rows.summary
    );
    let mut answers = Vec::new();
    for i in 0..4 {
        let s = rows.sample(&encoder, 1, i).unwrap();
        assert_eq!(s.frames, 6);
        // The frames are the video's uniform 6-frame sample, decoded independently.
        let video = if s.answer.contains("42") {
            "a.mp4"
        } else {
            "b.mp4"
        };
        let (_, batch) = decode_all(
            dir.join(video),
            &Sampling::Uniform { count: 6 },
            &DecodeOptions::siglip(side as u32),
        )
        .unwrap();
        assert_eq!(s.pixels, batch.pixels, "sample {i}");
        // Only the reply (reasoning and answer) and the turn's end are supervised.
        let supervised: Vec<u32> = s
            .ids
            .iter()
            .zip(&s.labels)
            .filter(|(_, l)| **l != IGNORE_INDEX)
            .map(|(&t, _)| t)
            .collect();
        let text = tokenizer.decode(&supervised, false).unwrap();
        assert!(text.starts_with(&s.answer), "{text:?} vs {:?}", s.answer);
        assert!(s.answer.starts_with("<think>") && s.answer.ends_with("</answer>"));
        assert!(text.trim_end().ends_with("<|im_end|>"), "{text:?}");
        answers.push(s.answer);
    }
    answers.sort();
    answers.dedup();
    assert_eq!(answers.len(), 2, "an epoch visits both rows");

    // Conversations: a video row and an image row (one frame, SigLIP-resized).
    let rows = RowSet::read(DataKind::Conversations, &conversations, 4).unwrap();
    let frames: Vec<usize> = (0..2)
        .map(|i| rows.sample(&encoder, 0, i).unwrap().frames)
        .collect();
    let mut sorted = frames.clone();
    sorted.sort();
    assert_eq!(sorted, vec![1, 4]);

    // A short CoT-SFT run on the file.
    let mut config = TrainConfig::default();
    config.run.out = tmp.0.join("run");
    config.run.steps = 4;
    config.run.batch_size = 2;
    config.run.checkpoint_every = 4;
    config.optim.warmup_steps = 1;
    config.model.stage = longview_train::Stage::CotSft;
    config.data.kind = DataKind::Cot;
    config.data.path = Some(cot.clone());
    config.data.frames = 4;
    config.validate("(test)").unwrap();
    let options = TrainOptions {
        progress: false,
        ..TrainOptions::default()
    };
    let summary = train(&config, &options, &device(), &mut quiet()).unwrap();
    assert_eq!(summary.losses.len(), 4);
    assert!(summary.losses.iter().all(|l| l.is_finite()));
    assert!(summary.eval.is_none(), "JSONL data has no held-out needles");
    assert!(summary.data.contains("2 samples"), "{}", summary.data);
}

#[test]
fn weight_decay_skips_biases_and_norms() {
    let _serial = serial();
    use burn::module::ModuleVisitor;
    use longview_train::trainer::optimizer;

    // Zero gradients: Adam's update is 0, so a step only applies the decoupled decay,
    // p * (1 - lr * wd), to the decayed parameters.
    let tokenizer = TextTokenizer::debug();
    let vlm = model_config(&TrainConfig::default(), &tokenizer).unwrap();
    let device = device();
    let model = vlm.init(&device);
    struct Zeros(GradientsParams);
    impl ModuleVisitor for Zeros {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0
                .register::<D>(param.id, param.val().zeros_like().inner());
        }
    }
    let mut zeros = Zeros(GradientsParams::new());
    model.visit(&mut zeros);
    struct Host(Vec<(usize, Vec<f32>)>);
    impl ModuleVisitor for Host {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let data = param.val().into_data().convert::<f32>();
            self.0.push((D, data.as_slice::<f32>().unwrap().to_vec()));
        }
    }
    let mut before = Host(Vec::new());
    model.visit(&mut before);

    let (lr, wd) = (0.1, 0.5);
    let config = OptimConfig {
        weight_decay: wd,
        ..OptimConfig::default()
    };
    let mut optim = optimizer(&config);
    let model = optim.step(lr, model, zeros.0);
    let mut after = Host(Vec::new());
    model.visit(&mut after);

    let (mut decayed, mut kept) = (0, 0);
    for ((rank, a), (_, b)) in before.0.iter().zip(&after.0) {
        let factor = if *rank >= 2 { 1.0 - lr * wd } else { 1.0 };
        for (x, y) in a.iter().zip(b) {
            assert!(
                (*x as f64 * factor - *y as f64).abs() <= 1e-6 * x.abs().max(1e-3) as f64,
                "rank-{rank} parameter: {x} -> {y}, expected factor {factor}"
            );
        }
        if *rank >= 2 { decayed += 1 } else { kept += 1 }
    }
    assert!(decayed > 10 && kept > 10, "{decayed} decayed, {kept} kept");
}

#[test]
fn lora_adapters_merge_into_the_same_function_and_unmerge_back() {
    let _serial = serial();
    use burn::nn::LinearConfig;
    use burn::tensor::{Distribution, Int};
    use longview_models::vila::config::TextConfig;
    use longview_models::vila::default_position_ids;

    let device = device();
    device.seed(21);
    let base = TextConfig::debug().init(&device);
    let ids = Tensor::<2, Int>::random([2, 12], Distribution::Uniform(0.0, 299.0), &device);
    let positions = default_position_ids(2, 12, &device);
    let host = |t: Tensor<3>| t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
    let reference = host(base.forward(ids.clone(), positions.clone()));

    // Fresh adapters (B = 0) change nothing.
    let mut adapted = base.clone().with_lora(4, 8.0, 3, &device);
    assert!(adapted.has_lora());
    let fresh = host(adapted.forward(ids.clone(), positions.clone()));
    let max_diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    assert_eq!(max_diff(&fresh, &reference), 0.0);

    // Trained-looking adapters: x W + s (x A) B equals x (W + s A B) after merging.
    for layer in &mut adapted.model.layers {
        let lora = layer.self_attn.lora.as_mut().unwrap();
        for adapter in [&mut lora.q, &mut lora.k, &mut lora.v, &mut lora.o] {
            let [rank, out] = adapter.lora_b.weight.dims();
            adapter.lora_b = LinearConfig::new(rank, out).with_bias(false).init(&device);
        }
    }
    let with_adapters = host(adapted.forward(ids.clone(), positions.clone()));
    assert!(
        max_diff(&with_adapters, &reference) > 1e-3,
        "the adapters act"
    );
    let scale = with_adapters.iter().fold(0f32, |m, v| m.max(v.abs()));
    let adapters: Vec<_> = adapted
        .model
        .layers
        .iter()
        .map(|l| l.self_attn.lora.clone().unwrap())
        .collect();
    let merged = adapted.clone().merge_lora();
    assert!(!merged.has_lora());
    let merged_out = host(merged.forward(ids.clone(), positions.clone()));
    assert!(
        max_diff(&merged_out, &with_adapters) <= 1e-5 * scale,
        "merged {} vs adapters (scale {scale})",
        max_diff(&merged_out, &with_adapters)
    );
    // Unmerging gives the base weights back to f32 rounding.
    let unmerged = merged.unmerge_lora(adapters);
    let w = |m: &longview_models::vila::Qwen2| {
        m.model.layers[1]
            .self_attn
            .o_proj
            .weight
            .val()
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap()
    };
    let (a, b) = (w(&unmerged), w(&base));
    assert!(
        max_diff(&a, &b) <= 1e-6,
        "unmerged o_proj off by {}",
        max_diff(&a, &b)
    );
    let again = host(unmerged.forward(ids, positions));
    assert!(max_diff(&again, &with_adapters) <= 1e-5 * scale);
}

#[test]
fn context_extension_trains_adapters_embeddings_and_norms_on_text_and_resumes() {
    let _serial = serial();
    use longview_models::hf::checkpoint::{SaveOptions, load_vila, save_vila};
    use longview_train::config::DataKind;

    let tmp = TempDir::new("stage4");
    let corpus = tmp.0.join("text.jsonl");
    let doc = |i: usize| {
        format!(
            "{{\"text\": \"Document {i}: the quick brown fox jumps over the lazy dog {} times, then rests.\"}}",
            i * 7
        )
    };
    let mut lines: Vec<String> = (0..12).map(doc).collect();
    lines.push("{\"title\": \"no text field\"}".into());
    std::fs::write(&corpus, lines.join("\n")).unwrap();

    // The starting model, saved so that frozen weights can be compared afterwards.
    let tokenizer = TextTokenizer::debug();
    let vlm = model_config(&TrainConfig::default(), &tokenizer).unwrap();
    let device = device();
    device.seed(5);
    let start = tmp.0.join("start");
    save_vila(
        &vlm.init(&device),
        &vlm,
        &start,
        SaveOptions {
            dtype: burn::tensor::DType::F32,
            max_shard_bytes: None,
        },
    )
    .unwrap();
    std::fs::write(
        start.join("llm").join("tokenizer.json"),
        tokenizer.inner().to_string(false).unwrap(),
    )
    .unwrap();

    let config = |out: &Path| {
        let mut c = TrainConfig::default();
        c.run.out = out.into();
        c.run.steps = 4;
        c.run.batch_size = 2;
        c.run.checkpoint_every = 2;
        c.optim.warmup_steps = 1;
        c.model.stage = longview_train::Stage::ContextExtension;
        c.model.init_from = Some(start.clone());
        c.model.rope_theta = Some(1_000_000.0);
        c.model.lora_rank = 4;
        c.data.kind = DataKind::Text;
        c.data.path = Some(corpus.clone());
        c.data.max_tokens = 48;
        c.validate("(test)").unwrap();
        c
    };
    let options = TrainOptions {
        progress: false,
        ..TrainOptions::default()
    };
    let straight = train(
        &config(&tmp.0.join("whole")),
        &options,
        &device,
        &mut quiet(),
    )
    .unwrap();
    assert!(
        straight.data.contains("1 rows skipped"),
        "{}",
        straight.data
    );
    assert!(straight.losses.iter().all(|l| l.is_finite()));
    assert!(
        straight.trainable_params < straight.params / 2,
        "{} of {} parameters train",
        straight.trainable_params,
        straight.params
    );

    // Interrupted after 2 steps, resumed: the same curve (adapters reloaded, base
    // weights unmerged from the saved merged model).
    let split = config(&tmp.0.join("split"));
    let first = TrainOptions {
        stop_after: Some(2),
        ..options.clone()
    };
    train(&split, &first, &device, &mut quiet()).unwrap();
    let resumed = train(
        &split,
        &TrainOptions {
            resume: true,
            ..options.clone()
        },
        &device,
        &mut quiet(),
    )
    .unwrap();
    for (a, b) in straight.losses[2..].iter().zip(&resumed.losses[2..]) {
        assert!((a - b).abs() <= 1e-5 * a.abs(), "{a} vs {b}");
    }

    // The saved model is merged (plain VILA layout) with the new RoPE base; the MLP
    // and the vision tower are the starting weights bit for bit, q_proj is not.
    let dir = straight.checkpoint.unwrap();
    assert!(dir.join("lora").join("model.safetensors").exists());
    let (trained, trained_config) = load_vila(&dir.join("model"), &device).unwrap();
    assert_eq!(trained_config.text.rope_theta, 1_000_000.0);
    assert!(!trained.llm.has_lora());
    let (initial, _) = load_vila(&start, &device).unwrap();
    let host2 = |t: Tensor<2>| t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
    fn layer(m: &longview_models::Vlm) -> &longview_models::vila::text::Qwen2DecoderLayer {
        &m.llm.model.layers[0]
    }
    assert_eq!(
        host2(layer(&trained).mlp.gate_proj.weight.val()),
        host2(layer(&initial).mlp.gate_proj.weight.val())
    );
    assert_eq!(
        host2(
            trained.vision_tower.encoder.layers[0]
                .self_attn
                .q_proj
                .weight
                .val()
        ),
        host2(
            initial.vision_tower.encoder.layers[0]
                .self_attn
                .q_proj
                .weight
                .val()
        )
    );
    assert_ne!(
        host2(layer(&trained).self_attn.q_proj.weight.val()),
        host2(layer(&initial).self_attn.q_proj.weight.val())
    );
    assert_ne!(
        host2(trained.llm.model.embed_tokens.weight.val()),
        host2(initial.llm.model.embed_tokens.weight.val())
    );
}

#[test]
fn train_flops_match_a_count_of_every_llm_matmul() {
    let _serial = serial();
    use longview_models::vila::train_flops;
    let tokenizer = TextTokenizer::debug();
    let vlm = model_config(&TrainConfig::default(), &tokenizer).unwrap();
    let device = device();
    let model = vlm.init(&device);
    let t = &vlm.text;
    let (h, d) = (t.hidden_size as f64, t.head_dim() as f64);
    let (q, kv) = (t.num_heads as f64 * d, t.num_kv_heads as f64 * d);
    let i = t.intermediate_size as f64;
    let seqs = [40usize, 17];
    // Forward: 2 FLOPs per multiply-add of every projection, the LM head, and
    // causal attention (QK^T and PV, half the square); backward twice the forward.
    let mut forward = 0.0;
    for &s in &seqs {
        let s = s as f64;
        let per_token = h * q + 2.0 * h * kv + q * h + 3.0 * h * i;
        forward += 2.0 * s * (per_token * t.num_layers as f64 + h * t.vocab_size as f64);
        forward += 2.0 * 2.0 * s * s * q * t.num_layers as f64 * 0.5;
    }
    let counted = 3.0 * forward;
    let estimate = train_flops(&model, &vlm, &seqs, 0);
    // The estimate also counts biases and norm scales as matmul parameters.
    assert!(
        (estimate - counted).abs() <= 0.01 * counted,
        "estimate {estimate:.4e} vs counted {counted:.4e}"
    );
}

#[test]
fn resume_from_a_named_checkpoint_repeats_the_curve_from_there() {
    let _serial = serial();
    let tmp = TempDir::new("resume-from");
    let cache = tmp.0.join("cache");
    let options = TrainOptions {
        progress: false,
        ..TrainOptions::default()
    };
    let config = tiny(&tmp.0.join("run"), &cache);
    let straight = train(&config, &options, &device(), &mut quiet()).unwrap();
    // keep_checkpoints = 2: steps 4 and 6 are on disk; go back to step 4.
    let step4 = config.run.out.join("checkpoints/step-000004");
    assert!(step4.join("trainer.json").exists());
    let from4 = TrainOptions {
        resume_from: Some(step4),
        ..options.clone()
    };
    let again = train(&config, &from4, &device(), &mut quiet()).unwrap();
    assert_eq!((again.first_step, again.last_step), (4, 6));
    assert_eq!(again.losses, straight.losses);
    // A folder that is no checkpoint is named in the error.
    let bogus = TrainOptions {
        resume_from: Some(tmp.0.join("nothing-here")),
        ..options
    };
    let message = train(&config, &bogus, &device(), &mut quiet())
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("nothing-here") && message.contains("not a complete checkpoint"),
        "{message}"
    );
}

#[test]
fn a_second_process_on_the_same_run_folder_is_refused() {
    let _serial = serial();
    let tmp = TempDir::new("lock");
    let config = tiny(&tmp.0.join("run"), &tmp.0.join("cache"));
    let options = TrainOptions {
        progress: false,
        ..TrainOptions::default()
    };
    std::fs::create_dir_all(&config.run.out).unwrap();
    // A live process (this one) holds the lock.
    let lock = config.run.out.join(".lock");
    std::fs::write(&lock, std::process::id().to_string()).unwrap();
    let message = train(&config, &options, &device(), &mut quiet())
        .unwrap_err()
        .to_string();
    assert!(
        message.contains(&format!("process {}", std::process::id())),
        "{message}"
    );
    assert!(
        !config.run.out.join("checkpoints").exists(),
        "nothing was written"
    );
    // A lock left by a process that is gone is taken over, and released at the end.
    std::fs::write(&lock, "4294967").unwrap();
    let mut short = config.clone();
    short.run.steps = 2;
    short.optim.warmup_steps = 1;
    train(&short, &options, &device(), &mut quiet()).unwrap();
    assert!(!lock.exists(), "the lock is released when the run ends");
}

#[test]
fn resuming_with_a_config_that_changes_the_run_is_refused_unless_allowed() {
    let _serial = serial();
    let tmp = TempDir::new("resume-config");
    let config = tiny(&tmp.0.join("run"), &tmp.0.join("cache"));
    let options = TrainOptions {
        progress: false,
        stop_after: Some(2),
        ..TrainOptions::default()
    };
    train(&config, &options, &device(), &mut quiet()).unwrap();
    let mut changed = config.clone();
    changed.run.batch_size = 1;
    changed.optim.lr = 5e-4;
    changed.run.checkpoint_every = 3; // cadence may change
    let resume = TrainOptions {
        resume: true,
        stop_after: Some(1),
        ..options.clone()
    };
    let message = train(&changed, &resume, &device(), &mut quiet())
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("run.batch_size: 2 -> 1") && message.contains("optim.lr"),
        "{message}"
    );
    assert!(!message.contains("checkpoint_every"), "{message}");
    let allowed = TrainOptions {
        allow_config_change: true,
        ..resume
    };
    let summary = train(&changed, &allowed, &device(), &mut quiet()).unwrap();
    assert_eq!(summary.last_step, 3);
}

#[test]
fn undecodable_videos_are_skipped_replaced_and_reported() {
    let _serial = serial();
    use longview_data::synthetic::SyntheticVideo;
    use longview_train::config::DataKind;
    let tmp = TempDir::new("skips");
    let dir = tmp.0.join("set");
    std::fs::create_dir_all(&dir).unwrap();
    SyntheticVideo::new(40, 40, 8, 12, 4)
        .write(dir.join("good.mp4"))
        .unwrap();
    // Exists (so the reader accepts the row) but is no video.
    std::fs::write(dir.join("bad.mp4"), b"not a video at all").unwrap();
    let rows = dir.join("rows.jsonl");
    std::fs::write(
        &rows,
        [
            r#"{"id": "g", "video": "good.mp4", "conversations": [{"from": "human", "value": "<video>\nWhat?"}, {"from": "gpt", "value": "A video."}]}"#,
            r#"{"id": "b", "video": "bad.mp4", "conversations": [{"from": "human", "value": "<video>\nWhat?"}, {"from": "gpt", "value": "Broken."}]}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let mut config = tiny(&tmp.0.join("run"), &tmp.0.join("cache"));
    config.data.kind = DataKind::Conversations;
    config.data.path = Some(rows.clone());
    config.data.frames = 4;
    config.data.min_frames = 4;
    config.data.eval_per_depth = 0;
    config.data.max_skipped_fraction = 0.9;
    let options = TrainOptions {
        progress: false,
        ..TrainOptions::default()
    };
    let straight = train(&config, &options, &device(), &mut quiet()).unwrap();
    assert_eq!(straight.losses.len(), 6);
    let log = std::fs::read_to_string(config.run.out.join("skipped.jsonl")).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert!(!lines.is_empty());
    assert!(
        lines
            .iter()
            .all(|l| l.contains("rows.jsonl:2") && l.contains("bad.mp4")),
        "{log}"
    );
    let metrics = std::fs::read_to_string(config.run.out.join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    assert_eq!(last["skipped"].as_u64(), Some(lines.len() as u64), "{last}");

    // Stopped and resumed, the run skips and substitutes the same samples.
    let mut split = config.clone();
    split.run.out = tmp.0.join("split");
    train(
        &split,
        &TrainOptions {
            stop_after: Some(3),
            ..options.clone()
        },
        &device(),
        &mut quiet(),
    )
    .unwrap();
    let resumed = train(
        &split,
        &TrainOptions {
            resume: true,
            ..options.clone()
        },
        &device(),
        &mut quiet(),
    )
    .unwrap();
    assert_eq!(resumed.losses, straight.losses);

    // Past the allowed share the run stops and says why.
    let mut strict = config.clone();
    strict.run.out = tmp.0.join("strict");
    strict.data.max_skipped_fraction = 0.01;
    let message = train(&strict, &options, &device(), &mut quiet())
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("max_skipped_fraction") && message.contains("skipped.jsonl"),
        "{message}"
    );
}

#[test]
fn a_damaged_latest_checkpoint_names_the_file_and_the_one_before() {
    let _serial = serial();
    let tmp = TempDir::new("damaged");
    let config = tiny(&tmp.0.join("run"), &tmp.0.join("cache"));
    let options = TrainOptions {
        progress: false,
        ..TrainOptions::default()
    };
    train(&config, &options, &device(), &mut quiet()).unwrap();
    // keep_checkpoints = 2 leaves steps 4 and 6; cut step 6's LLM weights short.
    let weights = config
        .run
        .out
        .join("checkpoints/step-000006/model/llm/model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let mut longer = config.clone();
    longer.run.steps = 8;
    let resume = TrainOptions {
        resume: true,
        ..options
    };
    let message = train(&longer, &resume, &device(), &mut quiet())
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("step-000006") && message.contains("--resume"),
        "{message}"
    );
    assert!(message.contains("step-000004"), "{message}");
    assert!(message.contains("llm"), "names the damaged part: {message}");
}

#[test]
fn a_token_budget_trains_saves_and_loads_with_the_checkpoint() {
    let _serial = serial();
    let tmp = TempDir::new("token-pool");
    let mut config = tiny(&tmp.0.join("run"), &tmp.0.join("cache"));
    config.run.steps = 2;
    config.run.checkpoint_every = 2;
    config.optim.warmup_steps = 1;
    // The debug projector makes a 3x3 token grid: 2x2 pooled tokens a frame.
    config.model.token_pool = Some(2);
    let options = TrainOptions {
        progress: false,
        ..TrainOptions::default()
    };
    let summary = train(&config, &options, &device(), &mut quiet()).unwrap();
    assert!(summary.losses.iter().all(|l| l.is_finite()));
    let loaded = longview_infer::load(&config.run.out, &device()).unwrap();
    assert_eq!(loaded.config.projector.token_pool, Some(2));
    assert_eq!(loaded.config.tokens_per_frame(), 4);
    assert_eq!(loaded.model.mm_projector.token_pool, Some(2));
    // A budget larger than the token grid is refused, naming the key.
    let mut too_big = config.clone();
    too_big.run.out = tmp.0.join("too-big");
    too_big.model.token_pool = Some(5);
    let message = train(&too_big, &options, &device(), &mut quiet())
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("model.token_pool") && message.contains("3x3"),
        "{message}"
    );
}
