//! Where a GRPO run's numbers go: `metrics.jsonl` (one JSON object a step: the step,
//! learning rate, skipped samples and the whole [`StepReport`]) and TensorBoard event
//! files under `<run.out>/tensorboard` (the report's scalars as `grpo/<field>`, the
//! held-out accuracy as `eval/held_out_accuracy`). Only the writing rank has them.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::TrainError;
use crate::sinks::{truncate_metrics, wall_s};
use crate::tensorboard::EventWriter;

use super::step::StepReport;

pub(crate) struct GrpoSinks {
    files: Option<(File, PathBuf, EventWriter)>,
}

impl GrpoSinks {
    /// Opens (appends to) `out`'s metrics after cutting them back to `done` steps: the
    /// rows a crashed run wrote after its last checkpoint go, and resumed steps write
    /// them again (TensorBoard is told to drop its events from there on too).
    pub fn open(out: &Path, writes: bool, done: usize) -> Result<GrpoSinks, TrainError> {
        if !writes {
            return Ok(GrpoSinks { files: None });
        }
        let path = out.join("metrics.jsonl");
        truncate_metrics(&path, done)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(TrainError::io(&path))?;
        let mut events = EventWriter::create(&out.join("tensorboard"))?;
        if done > 0 {
            events.session_start(done as i64 + 1, wall_s())?;
        }
        Ok(GrpoSinks {
            files: Some((file, path, events)),
        })
    }

    /// One finished step (`step` counts from 1).
    pub fn step(
        &mut self,
        step: usize,
        lr: f64,
        skipped: usize,
        report: &StepReport,
    ) -> Result<(), TrainError> {
        let Some((file, path, events)) = self.files.as_mut() else {
            return Ok(());
        };
        let row = serde_json::json!({
            "step": step, "stage": "grpo", "lr": lr, "skipped": skipped, "report": report
        });
        writeln!(file, "{row}").map_err(TrainError::io(&*path))?;
        let (wall, at) = (wall_s(), step as i64);
        let reserved_mib = report
            .reserved_bytes
            .map(|b| b as f64 / (1u64 << 20) as f64);
        let scalars = [
            ("reward_mean", Some(report.reward_mean as f64)),
            ("reward_std", Some(report.reward_std as f64)),
            ("accuracy", Some(report.accuracy as f64)),
            ("format_rate", Some(report.format_rate as f64)),
            ("kl", Some(report.kl as f64)),
            ("clip_fraction", Some(report.clip_fraction as f64)),
            ("entropy", Some(report.entropy as f64)),
            (
                "response_tokens_mean",
                Some(report.response_tokens_mean as f64),
            ),
            ("loss", Some(report.loss as f64)),
            ("grad_norm", Some(report.grad_norm as f64)),
            ("logprob_mismatch", Some(report.logprob_mismatch as f64)),
            ("dropped_groups", Some(report.dropped_groups as f64)),
            ("skipped_updates", Some(report.skipped_updates as f64)),
            ("rollout_s", Some(report.rollout_s)),
            ("encode_s", Some(report.encode_s)),
            ("prefill_s", Some(report.prefill_s)),
            ("decode_s", Some(report.decode_s)),
            ("update_s", Some(report.update_s)),
            ("decode_tokens_per_s", Some(report.decode_tokens_per_s)),
            ("reserved_mib", reserved_mib),
            ("lr", Some(lr)),
            ("skipped_samples", Some(skipped as f64)),
        ];
        for (name, value) in scalars {
            if let Some(value) = value {
                events.scalar(&format!("grpo/{name}"), at, value as f32, wall)?;
            }
        }
        Ok(())
    }

    /// The held-out accuracy after `step` steps.
    pub fn held_out(&mut self, step: usize, accuracy: f64) -> Result<(), TrainError> {
        if let Some((_, _, events)) = self.files.as_mut() {
            events.scalar(
                "eval/held_out_accuracy",
                step as i64,
                accuracy as f32,
                wall_s(),
            )?;
        }
        Ok(())
    }

    /// Flushes both files (before a checkpoint, so the metrics never lag it).
    pub fn flush(&mut self) -> Result<(), TrainError> {
        if let Some((file, path, events)) = self.files.as_mut() {
            file.flush().map_err(TrainError::io(&*path))?;
            events.flush()?;
        }
        Ok(())
    }
}
