//! Samples that cannot be used (a video that does not decode, a row that does not
//! tokenize, a sequence longer than the model's context) are skipped, not fatal: the
//! data worker replaces each with a deterministic substitute (a function of the run
//! seed and the stream position, so a resumed run skips and substitutes exactly as
//! the uninterrupted one did), the writer appends one line per skip to
//! `<run.out>/skipped.jsonl` (stream position, step, reason naming the file and
//! line), `metrics.jsonl` counts them, and past `data.max_skipped_fraction` of the
//! samples drawn the run stops with an error that says so.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::data::{Encoder, Sample, TrainData};
use crate::error::TrainError;

/// Skips allowed whatever their share.
pub const ALWAYS_ALLOWED: usize = 3;

/// Substitutes tried for one failed sample before the run stops.
pub const SUBSTITUTES: usize = 16;

/// One skipped sample.
#[derive(Debug, Clone, Serialize)]
pub struct Skip {
    /// Position in the sample stream (the substitute's attempt for substitutes).
    pub index: usize,
    /// Why, naming the file (and JSONL line) where there is one.
    pub reason: String,
}

/// One step's samples and what was skipped to get them.
pub struct Drawn {
    pub samples: Vec<Sample>,
    pub skipped: Vec<Skip>,
}

/// Sample `index` of the stream, or its first usable substitute. Samples longer
/// than `max_len` tokens are skipped too.
pub fn draw(
    data: &TrainData,
    encoder: &Encoder<'_>,
    seed: u64,
    index: usize,
    max_len: usize,
    skipped: &mut Vec<Skip>,
) -> Result<Sample, TrainError> {
    let check = |s: Sample| {
        if s.ids.len() > max_len {
            Err(TrainError::Request(format!(
                "{} tokens, longer than the run's limit of {max_len} (data.max_sample_tokens; \
                 default the model's max_position_embeddings)",
                s.ids.len()
            )))
        } else {
            Ok(s)
        }
    };
    let mut last = match data.sample(encoder, seed, index).and_then(check) {
        Ok(sample) => return Ok(sample),
        Err(e) => e,
    };
    skipped.push(Skip {
        index,
        reason: last.to_string(),
    });
    for attempt in 0..SUBSTITUTES {
        let substitute = index * SUBSTITUTES + attempt;
        match data
            .sample(encoder, seed ^ 0x05ab_5717_u64, substitute)
            .and_then(check)
        {
            Ok(sample) => return Ok(sample),
            Err(e) => {
                skipped.push(Skip {
                    index: substitute,
                    reason: format!("substitute {attempt} for sample {index}: {e}"),
                });
                last = e;
            }
        }
    }
    Err(TrainError::Request(format!(
        "sample {index} and {SUBSTITUTES} substitutes could not be used; the last: {last}"
    )))
}

/// The writer's record of skipped samples.
pub struct SkipLog {
    path: PathBuf,
    /// Written when this rank writes the run's files.
    writes: bool,
    /// Skipped so far in the whole run (resumed runs included).
    pub total: usize,
    max_fraction: f64,
}

impl SkipLog {
    /// Continues a run that had skipped `total` samples.
    pub fn open(out: &Path, writes: bool, total: usize, max_fraction: f64) -> SkipLog {
        SkipLog {
            path: out.join("skipped.jsonl"),
            writes,
            total,
            max_fraction,
        }
    }

    /// Records step `step`'s skips (`used`: the samples used in the run, this step's
    /// included); errors when more than the allowed share of all samples drawn were
    /// skipped (a few, [`ALWAYS_ALLOWED`], always are: one bad row met early in a
    /// run is not a broken dataset).
    pub fn record(&mut self, step: usize, used: usize, skipped: &[Skip]) -> Result<(), TrainError> {
        if skipped.is_empty() {
            return Ok(());
        }
        self.total += skipped.len();
        if self.writes {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .map_err(TrainError::io(&self.path))?;
            for skip in skipped {
                let row =
                    serde_json::json!({ "step": step, "index": skip.index, "reason": skip.reason });
                writeln!(file, "{row}").map_err(TrainError::io(&self.path))?;
            }
        }
        let drawn = used + self.total;
        let fraction = self.total as f64 / drawn.max(1) as f64;
        if fraction > self.max_fraction && self.total > ALWAYS_ALLOWED {
            return Err(TrainError::Request(format!(
                "{} of {drawn} samples drawn so far could not be used ({:.1}%, above data.max_skipped_fraction = {}); the reasons are in {}",
                self.total,
                100.0 * fraction,
                self.max_fraction,
                self.path.display()
            )));
        }
        Ok(())
    }
}
