//! Scoring and decoding: needle answers read at the right positions, multiple choice,
//! and the top-p sampler.

use super::*;

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

/// A random debug VLM saved as a VILA folder at `dir` with the debug tokenizer, and
/// loaded back as `eval` loads a checkpoint.
fn saved_debug_model(dir: &Path, device: &Device) -> longview_train::eval::EvalModel {
    use longview_models::hf::checkpoint::{SaveOptions, save_vila};
    let tokenizer = TextTokenizer::debug();
    let vlm = model_config(&TrainConfig::default(), &tokenizer).unwrap();
    save_vila(&vlm.init(device), &vlm, dir, SaveOptions::default()).unwrap();
    std::fs::write(
        dir.join("llm/tokenizer.json"),
        tokenizer.inner().to_string(false).unwrap(),
    )
    .unwrap();
    longview_train::eval::load(dir, device).unwrap()
}

#[test]
fn multiple_choice_picks_the_option_letter_with_the_largest_logit() {
    let _serial = serial();
    use longview_data::dataset::{ReadOptions, read_multiple_choice};
    use longview_data::synthetic::{HaystackSpec, write_haystack_set};
    use longview_data::{DecodeOptions, Media, Message, Sampling};

    let tmp = TempDir::new("choice");
    let tokenizer = TextTokenizer::debug();
    let device = Device::flex();
    let model = saved_debug_model(&tmp.0.join("model"), &device);

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
                model.config.tokens_per_frame(),
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

    // Sequence-parallel (`eval --task choice --parallel 2`): every prompt prefilled
    // over 2 in-process ranks picks the same letters.
    let text = &model.config.text;
    let reports: Vec<_> = std::thread::scope(|scope| {
        longview_comm::LocalWorld::communicators(2)
            .into_iter()
            .map(|comm| {
                let (model, samples, device) = (&model, &samples, &device);
                scope.spawn(move || {
                    let sp = longview_parallel::inference::SpInference::new(comm, text.head_dim())
                        .unwrap();
                    let mut last = |ids: &[u32], visual| {
                        Ok(sp.last_logits(&model.model, ids, visual, device)?)
                    };
                    longview_train::eval::multiple_choice_with(
                        model,
                        samples,
                        6,
                        device,
                        &mut |_: &str| {},
                        &mut last,
                    )
                    .unwrap()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect()
    });
    for sp in reports {
        assert_eq!(sp.chosen, report.chosen);
        assert_eq!(sp.correct, report.correct);
    }
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

/// `eval` of a CoT-SFT / GRPO checkpoint: the answer format is read from the
/// checkpoint's trainer.json, and open answers in the think format are scored by the
/// number inside `<answer>` (a plain-format score of the same replies is 0).
#[test]
fn think_format_checkpoints_are_scored_by_the_number_in_their_answer_tags() {
    let _serial = serial();
    use longview_infer::batch::BatchRequest;
    use longview_infer::generate::{Decoding, Generation};
    use longview_train::AnswerFormat;
    use longview_train::eval::{open_needle_with, trained_answer_format};
    use longview_train::grpo::reward::needle_cot_answer;

    let tmp = TempDir::new("think-eval");
    let tokenizer = TextTokenizer::debug();
    let device = Device::flex();
    let checkpoint = tmp.0.join("step-000001");
    let model = saved_debug_model(&checkpoint.join("model"), &device);

    // No trainer.json (a VILA export): no trained format.
    assert_eq!(trained_answer_format(&model.dir).unwrap(), None);
    let state = checkpoint.join("trainer.json");
    let with_config = |config: &str| {
        std::fs::write(&state, serde_json::json!({ "config": config }).to_string()).unwrap();
        trained_answer_format(&model.dir)
    };
    assert_eq!(
        with_config("[data]\nanswer_format = \"think\"\n").unwrap(),
        Some(AnswerFormat::Think)
    );
    assert_eq!(
        with_config("[run]\nsteps = 3\n").unwrap(),
        Some(AnswerFormat::Plain)
    );
    let err = with_config("[data]\nanswer_format = \"cot\"\n").unwrap_err();
    assert!(
        err.to_string().contains("trainer.json") && err.to_string().contains("\"cot\""),
        "{err}"
    );

    // The held-out answers in the order the evaluation asks them.
    let videos = tmp.0.join("videos");
    let truth: Vec<String> = haystack(&model.encoder(), &videos, 4, 4, 0, 1, 3)
        .unwrap()
        .eval
        .into_iter()
        .map(|s| s.answer)
        .collect();
    assert_eq!(truth.len(), 6);
    // A generator that answers every other prompt right, in the think format.
    let replies: Vec<Vec<u32>> = truth
        .iter()
        .enumerate()
        .map(|(i, answer)| {
            let number = if i % 2 == 0 { answer.as_str() } else { "100" };
            tokenizer.encode(&needle_cot_answer(number)).unwrap()
        })
        .collect();
    for format in [AnswerFormat::Think, AnswerFormat::Plain] {
        let mut next = 0;
        let mut generate = |requests: Vec<BatchRequest>| {
            Ok(requests
                .iter()
                .map(|r| {
                    let tokens = replies[next].clone();
                    next += 1;
                    if format == AnswerFormat::Think {
                        assert!(r.limits.max_new_tokens >= tokens.len());
                    }
                    vec![Generation {
                        tokens,
                        ..Generation::default()
                    }]
                })
                .collect())
        };
        let report = open_needle_with(
            &model,
            (&[4], 1, 3, &videos),
            (Decoding::Greedy, format),
            None,
            &device,
            &mut |_: &str| {},
            &mut generate,
        )
        .unwrap();
        assert_eq!(report.total, 6);
        let expected = match format {
            AnswerFormat::Think => 3,
            AnswerFormat::Plain => 0,
        };
        assert_eq!(report.correct, expected, "{format:?}: {:?}", report.answers);
        for (i, a) in report.answers.iter().enumerate() {
            assert_eq!(a.answer, truth[i]);
            assert!(a.generated.contains("</answer>"), "{:?}", a.generated);
        }
    }
}

/// An interrupted needle evaluation resumes: the lengths it finished are read back
/// (not scored again) under the same key, the grid equals an uninterrupted run's,
/// and a record written under another key is ignored.
#[test]
fn an_interrupted_needle_grid_resumes_at_the_first_unscored_length() {
    let _serial = serial();
    use longview_train::AnswerFormat;
    use longview_train::eval::{EvalProgress, needle_grid_with};

    let tmp = TempDir::new("eval-resume");
    let device = Device::flex();
    let model = saved_debug_model(&tmp.0.join("model"), &device);
    let videos = tmp.0.join("videos");
    let record = tmp.0.join("needle.progress.json");
    let lengths = [4, 6];
    let grid = |progress: Option<&mut EvalProgress>, fail_at: Option<usize>| {
        let mut scored = Vec::new();
        let result = needle_grid_with(
            &model,
            (&lengths, 1, 3, &videos),
            AnswerFormat::Plain,
            progress,
            &mut |_: &str| {},
            &mut |samples| {
                let frames = samples[0].frames;
                if Some(frames) == fail_at {
                    return Err(TrainError::Request("interrupted".into()));
                }
                scored.push(frames);
                Ok(longview_train::needle::score(
                    &model.model,
                    samples,
                    &model.tokenizer,
                    &device,
                )?)
            },
        );
        (result, scored)
    };
    let (whole, _) = grid(None, None);
    let whole = whole.unwrap();

    // Interrupted while scoring the 6-frame videos: the 4-frame result is on disk.
    let mut progress = EvalProgress::open(&record, "k".into(), true);
    let (cut, scored) = grid(Some(&mut progress), Some(6));
    assert!(cut.is_err());
    assert_eq!(scored, vec![4]);
    // Resumed: only the 6-frame videos are scored, and the grid is the whole run's.
    let mut progress = EvalProgress::open(&record, "k".into(), true);
    assert_eq!(progress.lengths(), vec![4]);
    let (resumed, scored) = grid(Some(&mut progress), None);
    let resumed = resumed.unwrap();
    assert_eq!(scored, vec![6]);
    assert_eq!(resumed.cells, whole.cells);
    assert_eq!(
        (resumed.correct, resumed.total),
        (whole.correct, whole.total)
    );
    // Another key (another checkpoint or settings) starts afresh.
    let other = EvalProgress::open(&record, "other".into(), true);
    assert!(other.lengths().is_empty());
}
