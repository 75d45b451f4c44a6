//! Where a run's numbers go: `metrics.jsonl` (one JSON object a step; the first row
//! of each invocation also holds the attention plan), TensorBoard event files, and
//! the progress bar, or a log line every few steps when stderr is not a terminal.
//! Only the writing rank has files.

use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::error::TrainError;
use crate::phases::StepPhases;
use crate::plan::PlanRecord;
use crate::tensorboard::EventWriter;

/// The writer's files, and the progress display every rank has (hidden off the writer).
pub(crate) struct Sinks {
    files: Option<(File, PathBuf, EventWriter)>,
    bar: ProgressBar,
    /// Steps between log lines when progress is asked for but stderr is no terminal.
    log_every: Option<usize>,
    /// The run's last step (what log lines count towards).
    total: usize,
    /// When the last log line went out: without a terminal a line also goes out
    /// after [`HEARTBEAT`] of silence, however long the steps are.
    last_line: std::time::Instant,
    plan: Option<PlanRecord>,
}

/// The longest a run without a terminal stays silent (a step ends it).
pub(crate) const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(60);

impl Sinks {
    /// Opens (appends to) `out`'s metrics after cutting them back to `done` steps.
    pub fn open(
        out: &Path,
        writes: bool,
        progress: bool,
        done: usize,
        total: usize,
        plan: PlanRecord,
    ) -> Result<Sinks, TrainError> {
        let files = if writes {
            let path = out.join("metrics.jsonl");
            truncate_metrics(&path, done)?;
            let mut events = EventWriter::create(&out.join("tensorboard"))?;
            if done > 0 {
                // A resumed run: TensorBoard forgets what an earlier session logged
                // from here on.
                events.session_start(done as i64 + 1, wall_s())?;
            }
            let metrics = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(TrainError::io(&path))?;
            Some((metrics, path, events))
        } else {
            None
        };
        let terminal = std::io::stderr().is_terminal();
        let bar = if progress && writes && terminal {
            ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr())
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:30}] step {pos}/{len} {msg}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_position(done as u64);
        let log_every = (progress && writes && !terminal).then(|| (total / 20).max(1));
        Ok(Sinks {
            files,
            bar,
            log_every,
            total,
            last_line: std::time::Instant::now(),
            plan: Some(plan),
        })
    }

    /// Records one step: a metrics row, the scalars, the progress message. Returns a
    /// line for the log when progress goes there instead of a bar.
    pub fn step(
        &mut self,
        mut line: Metrics,
        message: String,
    ) -> Result<Option<String>, TrainError> {
        line.attention = self.plan.take();
        let step = line.step;
        if let Some((metrics, path, events)) = self.files.as_mut() {
            writeln!(
                metrics,
                "{}",
                serde_json::to_string(&line).expect("metrics serialise")
            )
            .map_err(TrainError::io(&*path))?;
            let wall = wall_s();
            let step_i = step as i64;
            events.scalar("train/loss", step_i, line.loss, wall)?;
            events.scalar("train/lr", step_i, line.lr as f32, wall)?;
            events.scalar("train/grad_norm", step_i, line.grad_norm, wall)?;
            events.scalar("train/tokens_per_s", step_i, line.tokens_per_s as f32, wall)?;
            // The same names as metrics.jsonl's fields.
            events.scalar("train/step_s", step_i, line.step_s as f32, wall)?;
            events.scalar("train/model_tflops", step_i, line.model_tflops as f32, wall)?;
            events.scalar("train/skipped", step_i, line.skipped as f32, wall)?;
            for (tag, value) in [
                ("train/mfu", line.mfu),
                ("train/device_mib", line.device_mib),
                ("train/rss_mib", line.rss_mib),
            ] {
                if let Some(value) = value {
                    events.scalar(tag, step_i, value as f32, wall)?;
                }
            }
            if let Some(accuracy) = line.needle_accuracy {
                events.scalar("eval/needle_accuracy", step_i, accuracy as f32, wall)?;
            }
        }
        self.bar.set_position(step as u64);
        let due =
            |every: &usize| step.is_multiple_of(*every) || self.last_line.elapsed() >= HEARTBEAT;
        let logged = self
            .log_every
            .filter(due)
            .map(|_| format!("step {step}/{}: {message}", self.total));
        if logged.is_some() {
            self.last_line = std::time::Instant::now();
        }
        self.bar.set_message(message);
        Ok(logged)
    }

    /// A line above the progress bar, or `None` when there is no bar (the caller logs it).
    pub fn println(&self, line: String) -> Option<String> {
        if self.bar.is_hidden() {
            Some(line)
        } else {
            self.bar.println(line);
            None
        }
    }

    /// Flushes the files (before a checkpoint, so the metrics never lag a checkpoint).
    pub fn flush(&mut self) -> Result<(), TrainError> {
        if let Some((metrics, path, events)) = self.files.as_mut() {
            metrics.flush().map_err(TrainError::io(&*path))?;
            events.flush()?;
        }
        Ok(())
    }

    /// An evaluation scalar after the last step.
    pub fn eval_scalar(&mut self, step: usize, accuracy: f64) -> Result<(), TrainError> {
        if let Some((_, _, events)) = self.files.as_mut() {
            events.scalar(
                "eval/needle_accuracy",
                step as i64,
                accuracy as f32,
                wall_s(),
            )?;
        }
        Ok(())
    }

    pub fn abandon(&self) {
        self.bar.abandon();
    }

    pub fn finish(&mut self) -> Result<(), TrainError> {
        self.bar.finish_and_clear();
        self.flush()
    }
}

pub(crate) fn wall_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The memory the device's allocator holds (MiB), where the backend reports it.
pub(crate) fn device_mib(device: &Device) -> Option<f64> {
    device
        .memory_pool_usage()
        .map(|usage| usage.bytes_reserved as f64 / (1u64 << 20) as f64)
}

/// One line of `metrics.jsonl`.
#[derive(Serialize)]
pub(crate) struct Metrics {
    pub(crate) step: usize,
    pub(crate) loss: f32,
    pub(crate) lr: f64,
    pub(crate) grad_norm: f32,
    pub(crate) tokens: usize,
    /// Tokens per second since the run (this invocation) began, start-up included.
    pub(crate) tokens_per_s: f64,
    /// Wall time of this step's forward, backward and optimizer update (data
    /// loading overlaps it on the worker thread).
    pub(crate) step_s: f64,
    pub(crate) elapsed_s: f64,
    pub(crate) rss_mib: Option<f64>,
    /// Memory held by the device's allocator after the step, MiB (GPU runs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) device_mib: Option<f64>,
    /// Model TFLOP/s of the step ([`longview_models::vila::train_flops`]).
    pub(crate) model_tflops: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) mfu: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) needle_accuracy: Option<f64>,
    /// Samples skipped so far in the run (`skipped.jsonl`).
    pub(crate) skipped: usize,
    /// The run's attention plan, in the first row of every invocation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) attention: Option<PlanRecord>,
    /// The step's parts in seconds (`--phase-timings`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) phases: Option<StepPhases>,
}

/// Resident memory of this process (Linux), MiB.
pub(crate) fn rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// Keeps `metrics.jsonl` to the steps a resumed run has already done, so the file is
/// one continuous curve.
pub(crate) fn truncate_metrics(path: &Path, done: usize) -> Result<(), TrainError> {
    if !path.exists() {
        return Ok(());
    }
    let text = std::fs::read_to_string(path).map_err(TrainError::io(path))?;
    let kept: String = text
        .lines()
        .filter(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                .is_some_and(|s| (s as usize) <= done)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(path, kept).map_err(TrainError::io(path))
}
