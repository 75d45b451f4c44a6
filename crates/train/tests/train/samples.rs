//! Training samples: needles inserted deterministically, JSONL conversation and CoT
//! rows with answer-only labels, and unusable samples skipped and replaced.

use super::*;

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
            r#"{"id": "m", "image": "still.png", "conversations": [{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "A gradient."}, {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Grey."}]}"#,
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
        assert_eq!(&s.pixels[..], &batch.pixels[..], "sample {i}");
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
    let frames: Vec<usize> = (0..3)
        .map(|i| rows.sample(&encoder, 0, i).unwrap().frames)
        .collect();
    let mut sorted = frames.clone();
    sorted.sort();
    assert_eq!(sorted, vec![1, 1, 4]);
    // For GRPO (one answer a row) the two-turn row is a bad row, named by its line.
    let rows = RowSet::read(DataKind::Conversations, &conversations, 4)
        .unwrap()
        .one_answer_per_row();
    let errors: Vec<String> = (0..3)
        .filter_map(|i| rows.sample(&encoder, 0, i).err())
        .map(|e| e.to_string())
        .collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("conversations.jsonl:3") && errors[0].contains("2 assistant turns"),
        "{errors:?}"
    );

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
    let options = no_progress();
    let summary = train(&config, &options, &device(), &mut quiet()).unwrap();
    assert_eq!(summary.losses.len(), 4);
    assert!(summary.losses.iter().all(|l| l.is_finite()));
    assert!(summary.eval.is_none(), "JSONL data has no held-out needles");
    assert!(summary.data.contains("2 samples"), "{}", summary.data);
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
    let options = no_progress();
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

/// `data.max_sample_tokens` is the longest sample a run takes: below every sample's
/// length each one is skipped and the run stops naming the key (the 1.5B configs
/// past 32k tokens need it raised; the default is the model's context).
#[test]
fn samples_past_data_max_sample_tokens_are_skipped_naming_the_key() {
    let _serial = serial();
    let tmp = TempDir::new("max-sample-tokens");
    let mut config = tiny(&tmp.0.join("run"), &tmp.0.join("cache"));
    config.data.max_sample_tokens = Some(8);
    let message = train(&config, &no_progress(), &device(), &mut quiet())
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("data.max_sample_tokens") && message.contains("limit of 8"),
        "{message}"
    );
}

/// A debug-size run sizes the vocabulary to the tokenizer; a 1.5B/7B shape keeps its
/// own and generates only the tokenizer's ids (a random 1.5B GRPO run with the
/// embedded tokenizer sampled id 86,746 of 151,936 and stopped decoding it).
#[test]
fn larger_shapes_generate_only_the_tokenizers_ids() {
    let tokenizer = TextTokenizer::debug();
    let debug = model_config(&TrainConfig::default(), &tokenizer).unwrap();
    assert_eq!(debug.text.vocab_size, tokenizer.vocab_size());
    assert_eq!(debug.generation_vocab, None);
    for size in ["1.5b", "7b"] {
        let mut config = TrainConfig::default();
        config.model.size = size.into();
        let vlm = model_config(&config, &tokenizer).unwrap();
        assert!(vlm.text.vocab_size > tokenizer.vocab_size(), "{size}");
        assert_eq!(vlm.generation_vocab, Some(tokenizer.vocab_size()), "{size}");
    }
}
