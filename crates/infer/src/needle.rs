//! Needle-in-a-haystack scoring as LongVILA does it: one teacher-forced forward pass
//! per sample; a sample is correct only if the argmax tokens at the answer positions
//! decode to the answer exactly (case and spaces folded).

use burn::tensor::{Device, Int, Tensor};
use longview_data::TextTokenizer;
use longview_models::{KvCache, VisualInput, Vlm};
use serde::Serialize;

use crate::error::InferError;
use crate::prefill::{
    DEFAULT_CHUNK, DEFAULT_FRAME_BATCH, check_request_fits, embed_prompt, prefill,
};
use crate::sample::Sample;

/// Accuracy per needle depth and overall.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct NeedleReport {
    /// `(depth, correct, total)`, depths ascending.
    pub per_depth: Vec<(f64, usize, usize)>,
    pub correct: usize,
    pub total: usize,
    /// What a model guessing uniformly among two-digit numbers scores (1/90).
    pub chance: f64,
}

impl NeedleReport {
    pub fn accuracy(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.correct as f64 / self.total as f64
        }
    }

    /// A text table: one row per depth.
    pub fn table(&self) -> String {
        let mut out = String::from("  depth   correct  accuracy\n");
        for (depth, correct, total) in &self.per_depth {
            out.push_str(&format!(
                "  {depth:>5.1}   {correct:>3}/{total:<3}  {:>6.1}%\n",
                100.0 * *correct as f64 / (*total).max(1) as f64
            ));
        }
        out.push_str(&format!(
            "  all     {:>3}/{:<3}  {:>6.1}%  (chance {:.1}%)\n",
            self.correct,
            self.total,
            100.0 * self.accuracy(),
            100.0 * self.chance
        ));
        out
    }
}

pub fn fold(text: &str) -> String {
    text.chars()
        .filter(|c| !c.is_whitespace())
        .flat_map(char::to_lowercase)
        .collect()
}

/// The argmax tokens the model puts at `sample`'s answer positions, decoded. The
/// sequence runs through the text layers in chunks of `chunk` rows (0: one pass;
/// the argmax rows equal a one-pass forward's) and the head runs on the answer rows
/// only.
pub fn teacher_forced_answer(
    model: &Vlm,
    sample: &Sample,
    tokenizer: &TextTokenizer,
    chunk: usize,
    device: &Device,
) -> Result<String, InferError> {
    let answer_len = tokenizer.encode(&sample.answer)?.len();
    if !scorable(sample, answer_len) {
        return Ok(String::new());
    }
    let ids = teacher_forced_ids(model, sample, answer_len, chunk, device)?;
    Ok(tokenizer.decode(&ids, true)?)
}

/// Whether `sample` has a prompt and `answer_len` answer tokens after it.
pub fn scorable(sample: &Sample, answer_len: usize) -> bool {
    let start = sample.prompt_len;
    answer_len > 0 && start > 0 && start + answer_len <= sample.ids.len()
}

/// The visual input of a sample: its frames, or none.
pub fn sample_visual(sample: &Sample, device: &Device) -> VisualInput {
    if sample.frames == 0 {
        return VisualInput::None;
    }
    VisualInput::Pixels(crate::pixels::frames_tensor(
        &[sample],
        0,
        sample.frames,
        device,
    ))
}

/// The argmax ids at the `answer_len` rows that predict the answer (rows
/// `prompt_len - 1 ..`), one device, chunked prefill.
pub fn teacher_forced_ids(
    model: &Vlm,
    sample: &Sample,
    answer_len: usize,
    chunk: usize,
    device: &Device,
) -> Result<Vec<u32>, InferError> {
    check_request_fits(model, (sample.ids.len(), 0, 1), chunk, None, device)?;
    let visual = sample_visual(sample, device);
    let embeds = embed_prompt(model, &sample.ids, visual, DEFAULT_FRAME_BATCH, device)?;
    let mut cache = KvCache::new();
    cache.reserve(sample.ids.len());
    // Position t predicts token t + 1.
    let start = sample.prompt_len;
    let hidden = prefill(model, embeds, chunk, &mut cache, start - 1).narrow(1, 0, answer_len);
    Ok(argmax_ids(model.logits(hidden)))
}

/// The argmax id of every row of `[1, rows, vocab]` logits.
pub fn argmax_ids(logits: Tensor<3>) -> Vec<u32> {
    let ids: Tensor<3, Int> = logits.argmax(2);
    ids.into_data()
        .convert::<i64>()
        .try_to_vec::<i64>()
        .expect("argmax gives integers")
        .into_iter()
        .map(|t| t as u32)
        .collect()
}

/// Scores every sample; depths are grouped as given in the samples.
pub fn score(
    model: &Vlm,
    samples: &[Sample],
    tokenizer: &TextTokenizer,
    device: &Device,
) -> Result<NeedleReport, InferError> {
    score_chunked(model, samples, tokenizer, DEFAULT_CHUNK, device)
}

/// [`score`] with the prefill chunk given (0: one pass per sample).
pub fn score_chunked(
    model: &Vlm,
    samples: &[Sample],
    tokenizer: &TextTokenizer,
    chunk: usize,
    device: &Device,
) -> Result<NeedleReport, InferError> {
    score_by(samples, tokenizer, |sample, answer_len| {
        teacher_forced_ids(model, sample, answer_len, chunk, device)
    })
}

/// Scores every sample with `predict(sample, answer_len)` giving the argmax ids at
/// its answer rows (whatever runs the model: one device, chunked, or
/// sequence-parallel ranks); samples without a prompt or answer count as wrong.
pub fn score_by(
    samples: &[Sample],
    tokenizer: &TextTokenizer,
    mut predict: impl FnMut(&Sample, usize) -> Result<Vec<u32>, InferError>,
) -> Result<NeedleReport, InferError> {
    let mut per_depth: Vec<(f64, usize, usize)> = Vec::new();
    let mut correct = 0;
    for sample in samples {
        let answer_len = tokenizer.encode(&sample.answer)?.len();
        let predicted = if scorable(sample, answer_len) {
            tokenizer.decode(&predict(sample, answer_len)?, true)?
        } else {
            String::new()
        };
        let ok = fold(&predicted) == fold(&sample.answer);
        correct += usize::from(ok);
        match per_depth
            .iter_mut()
            .find(|(d, _, _)| (d - sample.depth).abs() < 1e-9)
        {
            Some(entry) => {
                entry.1 += usize::from(ok);
                entry.2 += 1;
            }
            None => per_depth.push((sample.depth, usize::from(ok), 1)),
        }
    }
    per_depth.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok(NeedleReport {
        per_depth,
        correct,
        total: samples.len(),
        chance: 1.0 / 90.0,
    })
}
