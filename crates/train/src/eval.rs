//! Evaluation of a saved model: the needle-in-a-haystack grid (haystack length x
//! needle depth) with LongVILA's teacher-forced exact-match scoring, written as a
//! table, JSON and a heatmap PNG.

use std::path::Path;

use burn::tensor::Device;
use serde::Serialize;

use crate::config::AnswerFormat;
use crate::data::{Sample, held_out_sample, held_out_videos, reformat_answers};
use crate::error::TrainError;
pub use crate::eval_progress::EvalProgress;
use crate::grpo::reward::{is_correct, needle_cot_answer};
use crate::needle;

/// A model loaded for evaluation, with its tokenizer.
pub use longview_infer::LoadedModel as EvalModel;
pub use longview_infer::load::{load, resolve_model_dir};

/// The answer format the run that wrote the checkpoint at `model_dir` trained with
/// (`data.answer_format` of the config saved in the checkpoint's `trainer.json`);
/// `None` when the folder is not in a longview checkpoint (a VILA export).
pub fn trained_answer_format(model_dir: &Path) -> Result<Option<AnswerFormat>, TrainError> {
    let Some(state) = model_dir
        .parent()
        .map(|checkpoint| checkpoint.join("trainer.json"))
        .filter(|path| path.is_file())
    else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(&state).map_err(TrainError::io(&state))?;
    let bad = |message: String| TrainError::checkpoint(&state, message);
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let Some(config) = json.get("config").and_then(|c| c.as_str()) else {
        return Ok(None);
    };
    let config: toml::Table = config
        .parse()
        .map_err(|e| bad(format!("its `config` is not TOML: {e}")))?;
    let format = config
        .get("data")
        .and_then(|d| d.get("answer_format"))
        .and_then(|f| f.as_str());
    match format {
        None | Some("plain") => Ok(Some(AnswerFormat::Plain)),
        Some("think") => Ok(Some(AnswerFormat::Think)),
        Some(other) => Err(bad(format!(
            "data.answer_format = {other:?}: expected \"plain\" or \"think\""
        ))),
    }
}

/// Accuracy of every (depth, haystack length) cell.
#[derive(Debug, Clone, Serialize)]
pub struct NeedleGrid {
    pub frames: Vec<usize>,
    pub depths: Vec<f64>,
    /// `cells[d][f]` = (correct, total) for depth `d` and length `frames[f]`.
    pub cells: Vec<Vec<(usize, usize)>>,
    pub correct: usize,
    pub total: usize,
    pub chance: f64,
}

impl NeedleGrid {
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.total.max(1) as f64
    }

    /// Markdown table: depths down, haystack lengths across.
    pub fn table(&self) -> String {
        let mut out = String::from("| depth |");
        for f in &self.frames {
            out.push_str(&format!(" {f} frames |"));
        }
        out.push_str("\n|---|");
        out.push_str(&"---|".repeat(self.frames.len()));
        out.push('\n');
        for (d, depth) in self.depths.iter().enumerate() {
            out.push_str(&format!("| {depth:.1} |"));
            for (c, t) in &self.cells[d] {
                out.push_str(&format!(" {c}/{t} |"));
            }
            out.push('\n');
        }
        out.push_str(&format!(
            "\nmean accuracy {:.1}% ({}/{}), chance {:.1}%\n",
            100.0 * self.accuracy(),
            self.correct,
            self.total,
            100.0 * self.chance
        ));
        out
    }

    /// The heatmap LongVILA draws: haystack length across, depth down, accuracy as
    /// colour with a colour bar; `title` names the checkpoint.
    pub fn write_heatmap(&self, path: &Path, title: &str) -> Result<(), TrainError> {
        crate::heatmap::write_needle_heatmap(path, &self.frames, &self.depths, &self.cells, title)
            .map_err(|e| TrainError::checkpoint(path, format!("writing the heatmap: {e}")))
    }
}

/// Scores `per_depth` generated videos for every haystack length in `frames` and every
/// depth of LongVILA's grid {0, .2, .4, .6, .8, 1}; videos are cached under `cache`.
/// The answers are written in `format` (a think-format model is teacher-forced on the
/// whole `<think>...</think><answer>NN</answer>` reply it was trained to give).
#[allow(clippy::too_many_arguments)]
pub fn needle_grid(
    model: &EvalModel,
    frames: &[usize],
    per_depth: usize,
    seed: u64,
    cache: &Path,
    format: AnswerFormat,
    device: &Device,
    log: &mut dyn FnMut(&str),
) -> Result<NeedleGrid, TrainError> {
    let videos = (frames, per_depth, seed, cache);
    needle_grid_with(model, videos, format, None, log, &mut |samples| {
        Ok(needle::score(
            &model.model,
            samples,
            &model.tokenizer,
            device,
        )?)
    })
}

/// Host bytes of decoded frames one scoring call holds at most (at least one video
/// whatever its length): the held-out videos of a length are decoded a few at a time,
/// so a 1024-frame grid (1.8 GB of f32 pixels a video at 384x384) never holds them
/// all.
const DECODED_BYTES: usize = 2 << 30;

/// The held-out `frames`-frame needle videos (`per_depth` per depth, `seed`) under
/// `cache`, decoded into samples `at_most` at a time (fewer when the frames of that
/// many would pass [`DECODED_BYTES`]), each batch handed to `each`. A length that
/// takes several batches logs its progress after each (long videos take minutes).
fn held_out_in_batches(
    model: &EvalModel,
    (frames, per_depth, seed, cache): (usize, usize, u64, &Path),
    at_most: usize,
    log: &mut dyn FnMut(&str),
    each: &mut dyn FnMut(Vec<Sample>) -> Result<(), TrainError>,
) -> Result<(), TrainError> {
    let encoder = model.encoder();
    let size = (encoder.width, encoder.height);
    let (dir, rows) = held_out_videos(cache, size, frames, per_depth, seed)?;
    let video_bytes = frames * 3 * encoder.side() * encoder.side() * 4;
    let batch = (DECODED_BYTES / video_bytes.max(1)).clamp(1, at_most.max(1));
    let mut done = 0;
    for part in rows.chunks(batch) {
        let samples = part
            .iter()
            .map(|r| held_out_sample(&encoder, &dir, r))
            .collect::<Result<Vec<_>, _>>()?;
        each(samples)?;
        done += part.len();
        if rows.len() > batch && done < rows.len() {
            log(&format!("{frames} frames: {done}/{} videos", rows.len()));
        }
    }
    Ok(())
}

/// Adds `part`'s counts to `total` (depths kept ascending).
fn add_report(total: &mut needle::NeedleReport, part: needle::NeedleReport) {
    for (depth, c, t) in part.per_depth {
        match total
            .per_depth
            .iter_mut()
            .find(|(d, _, _)| (d - depth).abs() < 1e-9)
        {
            Some(entry) => {
                entry.1 += c;
                entry.2 += t;
            }
            None => total.per_depth.push((depth, c, t)),
        }
    }
    total.per_depth.sort_by(|a, b| a.0.total_cmp(&b.0));
    total.correct += part.correct;
    total.total += part.total;
    total.chance = part.chance;
}

/// Scores of one haystack length's samples.
pub type NeedleScorer<'a> =
    dyn FnMut(&[crate::data::Sample]) -> Result<needle::NeedleReport, TrainError> + 'a;

/// [`needle_grid`] with the samples of each length scored by `score` (e.g. on
/// sequence-parallel ranks); `videos`: the haystack lengths, videos per depth, seed
/// and video folder. With `progress`, lengths it holds are taken from it and each
/// length scored is recorded in it (an interrupted run resumes).
pub fn needle_grid_with(
    model: &EvalModel,
    videos: (&[usize], usize, u64, &Path),
    format: AnswerFormat,
    mut progress: Option<&mut EvalProgress>,
    log: &mut dyn FnMut(&str),
    score: &mut NeedleScorer<'_>,
) -> Result<NeedleGrid, TrainError> {
    let (frames, per_depth, seed, cache) = videos;
    let encoder = model.encoder();
    let depths: Vec<f64> = (0..=5).map(|i| i as f64 / 5.0).collect();
    let mut cells = vec![vec![(0, 0); frames.len()]; depths.len()];
    let (mut correct, mut total) = (0, 0);
    for (f, &n) in frames.iter().enumerate() {
        let saved = progress
            .as_deref()
            .and_then(|p| p.get::<needle::NeedleReport>(n));
        let report = match saved {
            Some(report) => {
                log(&format!("{n} frames: scored before (resumed)"));
                report
            }
            None => {
                let mut report = needle::NeedleReport {
                    per_depth: Vec::new(),
                    correct: 0,
                    total: 0,
                    chance: 0.0,
                };
                let videos = (n, per_depth, seed, cache);
                held_out_in_batches(model, videos, 8, log, &mut |samples| {
                    let samples = reformat_answers(&encoder, samples, format)?;
                    add_report(&mut report, score(&samples)?);
                    Ok(())
                })?;
                if let Some(p) = progress.as_deref_mut() {
                    p.put(n, &report)?;
                }
                report
            }
        };
        for (depth, c, t) in report.per_depth {
            let d = depths
                .iter()
                .position(|x| (x - depth).abs() < 1e-9)
                .expect("haystack eval depths are the LongVILA grid");
            cells[d][f] = (c, t);
        }
        correct += report.correct;
        total += report.total;
        log(&format!(
            "{n} frames: {}/{} ({:.1}%)",
            report.correct,
            report.total,
            100.0 * report.correct as f64 / report.total.max(1) as f64
        ));
    }
    Ok(NeedleGrid {
        frames: frames.to_vec(),
        depths,
        cells,
        correct,
        total,
        chance: 1.0 / 90.0,
    })
}

/// Multiple-choice accuracy, overall and per VideoMME duration class.
#[derive(Debug, Clone, Serialize)]
pub struct ChoiceReport {
    pub correct: usize,
    pub total: usize,
    /// `(duration, correct, total)` for rows that give a duration.
    pub per_duration: Vec<(String, usize, usize)>,
    /// The letter chosen for every scored row, in order.
    pub chosen: Vec<char>,
    /// Rows that could not be scored (their video did not decode), with the reason;
    /// not in `total`.
    pub skipped: Vec<String>,
}

impl ChoiceReport {
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.total.max(1) as f64
    }
}

/// The next-token logits after a prompt (its ids, its video's frames): how a
/// multiple-choice prompt is run, on one device ([`one_device_logits`]) or
/// sequence-parallel.
pub type LastLogits<'a> =
    &'a mut dyn FnMut(&[u32], longview_models::VisualInput) -> Result<Vec<f32>, TrainError>;

/// [`LastLogits`] on one device: the prompt prefilled in chunks, refused with the
/// numbers when even that would not fit.
pub fn one_device_logits(
    model: &longview_models::Vlm,
    ids: &[u32],
    visual: longview_models::VisualInput,
    device: &Device,
) -> Result<Vec<f32>, TrainError> {
    use longview_infer::prefill::{DEFAULT_CHUNK, check_request_fits};
    check_request_fits(model, (ids.len(), 0, 1), DEFAULT_CHUNK, None, device)?;
    let (_, last) = longview_infer::generate::prefill_prompt(
        model,
        ids,
        visual,
        DEFAULT_CHUNK,
        ids.len(),
        device,
    )?;
    Ok(last)
}

/// The option letter the model ranks highest after `sample`'s prompt: video +
/// question + options + LongVILA's "Respond with only the letter" instruction
/// (`last_logits` runs it), then the largest next-token logit among the option
/// letters' tokens.
pub fn choose(
    model: &EvalModel,
    sample: &longview_data::dataset::ChoiceSample,
    frames: usize,
    device: &Device,
    last_logits: LastLogits<'_>,
) -> Result<char, TrainError> {
    use longview_data::{Media, Message, Sampling};
    let letters: Vec<char> = ('A'..='Z').take(sample.options.len()).collect();
    let mut letter_ids = Vec::with_capacity(letters.len());
    for letter in &letters {
        match model.tokenizer.encode(&letter.to_string())?.as_slice() {
            [id] => letter_ids.push(*id as usize),
            other => {
                return Err(TrainError::Config {
                    source_name: model.tokenizer.source().into(),
                    message: format!(
                        "option letter {letter} is {} tokens, not one: cannot rank options",
                        other.len()
                    ),
                });
            }
        }
    }
    let (pixels, picked) = crate::data::decode_frames(
        &sample.video,
        &Sampling::Uniform { count: frames },
        model.config.vision.image_size,
        device,
    )?;
    let got = picked.len();
    let encoded = longview_data::ChatTemplate::qwen2().encode(
        &model.tokenizer,
        &[Message::user(sample.prompt())],
        // One video: the projector pools its frames whole (`visual_frames` groups).
        &[Media::Video {
            frames: model.config.visual_frames(got),
        }],
        model.config.tokens_per_frame(),
        true,
    )?;
    let last = last_logits(&encoded.ids, longview_models::VisualInput::Pixels(pixels))?;
    let best = (0..letters.len())
        .max_by(|&a, &b| {
            last[letter_ids[a]]
                .total_cmp(&last[letter_ids[b]])
                .then(b.cmp(&a))
        })
        .expect("at least two options");
    Ok(letters[best])
}

/// Scores VideoMME-style rows (see `longview_data::dataset::read_multiple_choice`),
/// sampling `frames` frames uniformly from every video, each prompt on one device.
pub fn multiple_choice(
    model: &EvalModel,
    rows: &[longview_data::dataset::ChoiceSample],
    frames: usize,
    device: &Device,
    log: &mut dyn FnMut(&str),
) -> Result<ChoiceReport, TrainError> {
    let mut last = |ids: &[u32], visual| one_device_logits(&model.model, ids, visual, device);
    multiple_choice_with(model, rows, frames, device, log, &mut last)
}

/// [`multiple_choice`] with every prompt run by `last_logits` (e.g. sequence-parallel).
pub fn multiple_choice_with(
    model: &EvalModel,
    rows: &[longview_data::dataset::ChoiceSample],
    frames: usize,
    device: &Device,
    log: &mut dyn FnMut(&str),
    last_logits: LastLogits<'_>,
) -> Result<ChoiceReport, TrainError> {
    let mut report = ChoiceReport {
        correct: 0,
        total: 0,
        per_duration: Vec::new(),
        chosen: Vec::new(),
        skipped: Vec::new(),
    };
    for (i, row) in rows.iter().enumerate() {
        let letter = match choose(model, row, frames, device, last_logits) {
            Ok(letter) => letter,
            Err(e) => {
                log(&format!("row {} skipped: {e}", i + 1));
                report.skipped.push(format!("row {}: {e}", i + 1));
                continue;
            }
        };
        let ok = letter == row.answer;
        report.correct += usize::from(ok);
        report.total += 1;
        report.chosen.push(letter);
        if let Some(duration) = &row.duration {
            match report
                .per_duration
                .iter_mut()
                .find(|(d, _, _)| d == duration)
            {
                Some(entry) => {
                    entry.1 += usize::from(ok);
                    entry.2 += 1;
                }
                None => report
                    .per_duration
                    .push((duration.clone(), usize::from(ok), 1)),
            }
        }
        if (i + 1) % 50 == 0 {
            log(&format!("{}/{} rows scored", i + 1, rows.len()));
        }
    }
    Ok(report)
}

/// One open-ended answer.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct OpenAnswer {
    pub frames: usize,
    pub depth: f64,
    pub answer: String,
    pub generated: String,
    pub correct: bool,
}

/// Open-ended needle answers: free generation (KV cache, greedy or top-p), scored by
/// exact match of the generated text (case and spaces folded), or for a think-format
/// model by the number inside its `<answer>` tags (GRPO's accuracy reward).
#[derive(Debug, Clone, Serialize)]
pub struct OpenReport {
    pub correct: usize,
    pub total: usize,
    pub answers: Vec<OpenAnswer>,
}

impl OpenReport {
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.total.max(1) as f64
    }
}

/// Prompts of the open-ended needle evaluation decoded together (each batch holds
/// its videos' pixels until its prompts are prefilled).
const OPEN_BATCH: usize = 8;

/// Generates the answers of a batch of needle prompts (one decoding each): how the
/// open-ended evaluation runs them, on one device (one batch) or sequence-parallel.
pub type GenerateAnswers<'a> =
    &'a mut dyn FnMut(
        Vec<longview_infer::batch::BatchRequest>,
    ) -> Result<Vec<Vec<longview_infer::generate::Generation>>, TrainError>;

/// Asks the needle question about `per_depth` generated videos per depth for every
/// haystack length in `frames` and generates the answer freely (no teacher forcing),
/// [`OPEN_BATCH`] prompts decoding as one batch.
#[allow(clippy::too_many_arguments)]
pub fn open_needle(
    model: &EvalModel,
    frames: &[usize],
    per_depth: usize,
    seed: u64,
    cache: &Path,
    decoding: crate::generate::Decoding,
    format: AnswerFormat,
    progress: Option<&mut EvalProgress>,
    device: &Device,
    log: &mut dyn FnMut(&str),
) -> Result<OpenReport, TrainError> {
    use longview_infer::batch::{BatchOptions, generate_batch};
    let mut one_batch = |requests| {
        Ok(generate_batch(
            &model.model,
            requests,
            &BatchOptions::default(),
            device,
        )?)
    };
    let videos = (frames, per_depth, seed, cache);
    open_needle_with(
        model,
        videos,
        (decoding, format),
        progress,
        device,
        log,
        &mut one_batch,
    )
}

/// [`open_needle`] with every batch of [`OPEN_BATCH`] prompts run by `generate`;
/// `videos`: the haystack lengths, videos per depth, seed and video folder; `answers`:
/// the decoding and the answer format.
pub fn open_needle_with(
    model: &EvalModel,
    videos: (&[usize], usize, u64, &Path),
    (decoding, format): (crate::generate::Decoding, AnswerFormat),
    mut progress: Option<&mut EvalProgress>,
    device: &Device,
    log: &mut dyn FnMut(&str),
    generate: GenerateAnswers<'_>,
) -> Result<OpenReport, TrainError> {
    use crate::data::frames_tensor;
    use longview_infer::batch::BatchRequest;
    use longview_infer::generate::Limits;
    use longview_models::VisualInput;
    let (frames, per_depth, seed, cache) = videos;
    // A two-digit number, or the think-format reply around one (with room to spare).
    let max_new_tokens = match format {
        AnswerFormat::Plain => 8,
        AnswerFormat::Think => model.tokenizer.encode(&needle_cot_answer("99"))?.len() + 16,
    };
    let limits = Limits {
        max_new_tokens,
        stop: crate::generate::stop_tokens(&model.tokenizer),
    };
    let mut answers = Vec::new();
    for &n in frames {
        if let Some(saved) = progress
            .as_deref()
            .and_then(|p| p.get::<Vec<OpenAnswer>>(n))
        {
            log(&format!("{n} frames: answered before (resumed)"));
            answers.extend(saved);
            continue;
        }
        let (mut correct, mut asked) = (0, 0);
        let mut mine = Vec::new();
        // The videos of a haystack length decode and generate as batches of
        // OPEN_BATCH prompts.
        held_out_in_batches(
            model,
            (n, per_depth, seed, cache),
            OPEN_BATCH,
            log,
            &mut |part| {
                // The frames go into the requests read in place from the samples'
                // buffers (no copy of the batch's pixels); what scoring needs is kept
                // aside.
                let asked_about: Vec<(f64, String)> =
                    part.iter().map(|s| (s.depth, s.answer.clone())).collect();
                let requests = part
                    .into_iter()
                    .map(|s| BatchRequest {
                        prompt: s.ids[..s.prompt_len].to_vec(),
                        visual: VisualInput::Pixels(frames_tensor(&[&s], 0, s.frames, device)),
                        samples: vec![decoding],
                        limits: limits.clone(),
                    })
                    .collect();
                let generations = generate(requests)?;
                for ((depth, answer), mut g) in asked_about.into_iter().zip(generations) {
                    let generated = model.tokenizer.decode(&g.remove(0).tokens, true)?;
                    let ok = match format {
                        AnswerFormat::Plain => needle::fold(&generated) == needle::fold(&answer),
                        AnswerFormat::Think => is_correct(&generated, &answer),
                    };
                    correct += usize::from(ok);
                    asked += 1;
                    mine.push(OpenAnswer {
                        frames: n,
                        depth,
                        answer,
                        generated,
                        correct: ok,
                    });
                }
                Ok(())
            },
        )?;
        log(&format!(
            "{n} frames: {correct}/{asked} generated answers exact"
        ));
        if let Some(p) = progress.as_deref_mut() {
            p.put(n, &mine)?;
        }
        answers.extend(mine);
    }
    Ok(OpenReport {
        correct: answers.iter().filter(|a| a.correct).count(),
        total: answers.len(),
        answers,
    })
}
