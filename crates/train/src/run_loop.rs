//! The bookkeeping around the training loop's steps: trainer state, periodic
//! held-out evaluation, metric rows and progress ([`crate::sinks`]), checkpoints, and
//! the run's summary. [`crate::trainer::train_with`] computes the steps and hands each
//! finished one to [`RunLoop::record`].

use std::ops::Range;
use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::Device;

use crate::config::TrainConfig;
use crate::data::Sample;
use crate::error::TrainError;
use crate::grads::count_params;
use crate::needle::{self, NeedleReport};
use crate::prepare::Prepared;
use crate::sinks::{Metrics, Sinks, device_mib, rss_mib};
use crate::skips::{Skip, SkipLog};
use crate::trainer::{SteadyRate, StepDone, StepRunner, TrainOptions, TrainSummary, step_range};
use crate::zero::{CheckpointOf, save_checkpoint};

/// One invocation's loop state: which steps it runs, where its metrics go, what it
/// has done so far.
pub(crate) struct RunLoop<'a> {
    config: &'a TrainConfig,
    options: &'a TrainOptions,
    runner: &'a dyn StepRunner,
    device: &'a Device,
    /// The held-out samples scored every `run.eval_every` steps and at the end.
    eval: Vec<Sample>,
    sinks: Sinks,
    first_step: usize,
    last_step: usize,
    timer: Instant,
    elapsed_before: f64,
    totals: Totals,
    skips: SkipLog,
}

/// What this invocation has done so far.
#[derive(Default)]
struct Totals {
    tokens: u64,
    flops: f64,
    /// Each step of this invocation: (seconds, model FLOP, tokens).
    steps: Vec<(f64, f64, u64)>,
    peak_device_mib: Option<f64>,
    checkpoint: Option<PathBuf>,
}

impl<'a> RunLoop<'a> {
    /// Opens the metric sinks for the steps this invocation runs.
    pub fn open(
        run: &Prepared,
        config: &'a TrainConfig,
        options: &'a TrainOptions,
        runner: &'a dyn StepRunner,
        device: &'a Device,
        eval: Vec<Sample>,
    ) -> Result<Self, TrainError> {
        let (first_step, last_step) = step_range(config, options, run.state.step);
        let sinks = Sinks::open(
            &config.run.out,
            runner.writes(),
            options.progress,
            first_step,
            config.run.steps,
            run.plan.record(),
        )?;
        Ok(RunLoop {
            config,
            options,
            runner,
            device,
            eval,
            sinks,
            first_step,
            last_step,
            timer: Instant::now(),
            elapsed_before: run.state.elapsed_s,
            totals: Totals::default(),
            skips: SkipLog::open(
                &config.run.out,
                runner.writes(),
                run.state.skipped,
                config.data.max_skipped_fraction,
            ),
        })
    }

    /// The 0-based steps this invocation runs.
    pub fn steps(&self) -> Range<usize> {
        self.first_step..self.last_step
    }

    /// The error for a non-finite loss at `step` (0-based); the progress bar is left
    /// as it stands.
    pub fn diverged(&self, step: usize, loss: f32) -> TrainError {
        self.sinks.abandon();
        TrainError::Diverged {
            step: step + 1,
            loss,
        }
    }

    /// Books the samples skipped to draw step `step`'s (0-based); errors past the
    /// configured share.
    pub fn skipped(
        &mut self,
        run: &Prepared,
        step: usize,
        skipped: &[Skip],
        log: &mut dyn FnMut(&str),
    ) -> Result<(), TrainError> {
        for skip in skipped {
            if let Some(line) = self
                .sinks
                .println(format!("skipped sample {}: {}", skip.index, skip.reason))
            {
                log(&line);
            }
        }
        let per_step = self.config.run.batch_size * self.config.run.grad_accum;
        self.skips
            .record(step + 1, run.state.samples_seen + per_step, skipped)
    }

    /// Books a finished (already applied) step: trainer state, held-out accuracy when
    /// due, the metrics row, and a checkpoint when due.
    pub fn record(
        &mut self,
        run: &mut Prepared,
        done: &StepDone,
        step_s: f64,
        log: &mut dyn FnMut(&str),
    ) -> Result<(), TrainError> {
        let per_step = self.config.run.batch_size * self.config.run.grad_accum;
        let state = &mut run.state;
        state.step += 1;
        state.samples_seen += per_step;
        state.skipped = self.skips.total;
        state.tokens_seen += done.tokens as u64;
        state.losses.push(done.loss);
        self.totals.tokens += done.tokens as u64;
        self.totals.flops += done.flops;
        self.totals
            .steps
            .push((step_s, done.flops, done.tokens as u64));
        let run_s = self.timer.elapsed().as_secs_f64();
        state.elapsed_s = self.elapsed_before + run_s;
        let step = state.step;

        let needle_accuracy = self.periodic_eval(run, log)?;
        let (row, message) = self.step_row(done, step_s, run_s, run.state.elapsed_s);
        let row = Metrics {
            step,
            needle_accuracy,
            skipped: self.skips.total,
            ..row
        };
        if let Some(line) = self.sinks.step(row, message)? {
            log(&line);
        }
        let every = self.config.run.checkpoint_every;
        if step.is_multiple_of(every) || step == self.last_step {
            if self.runner.writes() {
                self.sinks.flush()?;
            }
            let of = CheckpointOf {
                out: &self.config.run.out,
                model: &run.model,
                config: &run.vlm_config,
                state: &run.state,
                tokenizer_json: &run.tokenizer_json,
                keep: self.config.run.keep_checkpoints,
            };
            if let Some(dir) = save_checkpoint(of, &run.optim, self.runner, self.device)? {
                self.totals.checkpoint = Some(dir);
            }
        }
        Ok(())
    }

    /// The held-out needle accuracy every `run.eval_every` steps (not at the last
    /// step, which [`RunLoop::finish`] scores).
    fn periodic_eval(
        &mut self,
        run: &Prepared,
        log: &mut dyn FnMut(&str),
    ) -> Result<Option<f64>, TrainError> {
        let (every, step) = (self.config.run.eval_every, run.state.step);
        let due = self.runner.writes()
            && every > 0
            && step % every == 0
            && step != self.config.run.steps
            && !self.eval.is_empty();
        if !due {
            return Ok(None);
        }
        let report = self.score_held_out(run)?;
        let line = format!(
            "step {step}: held-out needle accuracy {:.1}%",
            100.0 * report.accuracy()
        );
        if let Some(line) = self.sinks.println(line) {
            log(&line);
        }
        Ok(Some(report.accuracy()))
    }

    /// The metrics row and progress message of a finished step.
    fn step_row(
        &mut self,
        done: &StepDone,
        step_s: f64,
        run_s: f64,
        elapsed_s: f64,
    ) -> (Metrics, String) {
        let tokens_per_s = self.totals.tokens as f64 / run_s.max(1e-9);
        let model_tflops = done.flops / step_s.max(1e-9) / 1e12;
        let mfu = self.options.matmul_tflops.map(|peak| model_tflops / peak);
        let (rss, device_mib) = (rss_mib(), device_mib(self.device));
        if let Some(mib) = device_mib {
            let peak = self.totals.peak_device_mib.map_or(mib, |p| p.max(mib));
            self.totals.peak_device_mib = Some(peak);
        }
        let message = format!(
            "loss {:.4} lr {:.2e} |g| {:.2} {tokens_per_s:.0} tok/s {}{}{}",
            done.loss,
            done.lr,
            done.grad_norm,
            match mfu {
                Some(m) => format!("MFU {:.1}%", 100.0 * m),
                None => format!("{model_tflops:.3} TFLOP/s"),
            },
            match device_mib {
                Some(m) => format!(" device {:.1} GiB", m / 1024.0),
                None => rss.map_or(String::new(), |m| format!(" rss {:.0} MiB", m)),
            },
            done.phases.as_ref().map_or(String::new(), |p| format!(
                " | step {step_s:.3} s: {}",
                p.describe()
            ))
        );
        let row = Metrics {
            step: 0,
            loss: done.loss,
            lr: done.lr,
            grad_norm: done.grad_norm,
            tokens: done.tokens,
            tokens_per_s,
            step_s,
            elapsed_s,
            rss_mib: rss,
            device_mib,
            model_tflops,
            mfu,
            needle_accuracy: None,
            skipped: 0,
            attention: None,
            phases: done.phases.clone(),
        };
        (row, message)
    }

    /// Closes the sinks, scores the held-out set when the run reached its last step,
    /// and summarises the invocation.
    pub fn finish(mut self, run: Prepared, data: String) -> Result<TrainSummary, TrainError> {
        self.sinks.finish()?;
        let complete = run.state.step == self.config.run.steps;
        let eval = match self.runner.writes() && complete && !self.eval.is_empty() {
            true => Some(self.final_eval(&run)?),
            false => None,
        };
        let run_s = self.timer.elapsed().as_secs_f64();
        let (params, trainable_params) = count_params(&run.model);
        Ok(TrainSummary {
            losses: run.state.losses.clone(),
            first_step: self.first_step,
            last_step: run.state.step,
            tokens_per_s: self.totals.tokens as f64 / run_s.max(1e-9),
            model_tflops: self.totals.flops / run_s.max(1e-9) / 1e12,
            elapsed_s: run_s,
            checkpoint: self.totals.checkpoint,
            eval,
            data,
            params,
            trainable_params,
            peak_device_mib: self.totals.peak_device_mib,
            attention: run.plan.clone(),
            steady: SteadyRate::after_first(&self.totals.steps),
        })
    }

    /// The held-out needles scored by this rank alone, on the model without autodiff.
    fn score_held_out(&self, run: &Prepared) -> Result<NeedleReport, TrainError> {
        let model = run.scoring_copy();
        let device = self.device.clone().inner();
        Ok(needle::score(&model, &self.eval, &run.tokenizer, &device)?)
    }

    /// The held-out needle score after the last step, written to `needle.json` and the
    /// event files.
    fn final_eval(&mut self, run: &Prepared) -> Result<NeedleReport, TrainError> {
        let report = self.score_held_out(run)?;
        self.sinks.eval_scalar(run.state.step, report.accuracy())?;
        let path = self.config.run.out.join("needle.json");
        let json = serde_json::to_string_pretty(&report).expect("report serialises");
        std::fs::write(&path, json).map_err(TrainError::io(&path))?;
        self.sinks.flush()?;
        Ok(report)
    }
}
