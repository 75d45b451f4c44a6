//! Needle-in-a-haystack scoring as LongVILA does it: one teacher-forced forward pass
//! per sample; a sample is correct only if the argmax tokens at the answer positions
//! decode to the answer exactly (case and spaces folded).

use burn::tensor::{Device, Int, Tensor};
use longview_data::TextTokenizer;
use longview_models::Vlm;
use serde::Serialize;

use crate::error::InferError;
use crate::sample::{Sample, collate};

/// Accuracy per needle depth and overall.
#[derive(Debug, Clone, PartialEq, Serialize)]
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

/// The argmax tokens the model puts at `sample`'s answer positions, decoded.
pub fn teacher_forced_answer(
    model: &Vlm,
    sample: &Sample,
    tokenizer: &TextTokenizer,
    device: &Device,
) -> Result<String, InferError> {
    let answer_len = tokenizer.encode(&sample.answer)?.len();
    let start = sample.prompt_len;
    if answer_len == 0 || start == 0 || start + answer_len > sample.ids.len() {
        return Ok(String::new());
    }
    let batch = collate(&[sample], device);
    let logits = model.forward(batch.input)?;
    let [_, _, vocab] = logits.dims();
    // Position t predicts token t + 1.
    let picked: Tensor<3> = logits.slice([0..1, start - 1..start - 1 + answer_len, 0..vocab]);
    let ids: Tensor<3, Int> = picked.argmax(2);
    let ids: Vec<u32> = ids
        .into_data()
        .convert::<i64>()
        .try_to_vec::<i64>()
        .expect("argmax gives integers")
        .into_iter()
        .map(|t| t as u32)
        .collect();
    Ok(tokenizer.decode(&ids, true)?)
}

/// Scores every sample; depths are grouped as given in the samples.
pub fn score(
    model: &Vlm,
    samples: &[Sample],
    tokenizer: &TextTokenizer,
    device: &Device,
) -> Result<NeedleReport, InferError> {
    let mut per_depth: Vec<(f64, usize, usize)> = Vec::new();
    let mut correct = 0;
    for sample in samples {
        let predicted = teacher_forced_answer(model, sample, tokenizer, device)?;
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
