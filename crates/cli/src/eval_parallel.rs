//! `longview eval --parallel SP`: every task on SP sequence-parallel ranks (threads on
//! the CPU, or launched processes over NCCL). Each prompt is prefilled with the
//! scheme of `--sp-scheme` and leaves every rank its shard of the KV cache:
//! - `needle`: the answer rows teacher-forced against the sharded cache;
//! - `open`: the answers generated against it, a batch of prompts decoding together
//!   (`SpInference::generate_batch`);
//! - `choice`: the next-token logits after the prompt (`SpInference::last_logits`).
//!
//! Rank 0 writes the generated videos before the others read them; every rank
//! returns the same results and rank 0's are reported.

use std::path::Path;

use anyhow::{Result, bail};
use burn::tensor::{Device, Tensor};
use longview_comm::{Communicator, ReduceOp};
use longview_parallel::inference::SpInference;
use longview_train::data::Sample;
use longview_train::eval::{ChoiceReport, EvalModel, NeedleGrid, OpenReport};
use longview_train::generate::Decoding;
use longview_train::{AnswerFormat, TrainError};

use crate::eval::EvalArgs;
use crate::ranks::{RankJob, Ranks};

/// What the ranks of a sequence-parallel evaluation run.
enum Task<'a> {
    Needle(AnswerFormat),
    Open(Decoding, AnswerFormat),
    Choice(&'a [longview_data::dataset::ChoiceSample]),
}

/// Rank 0's result of a sequence-parallel task.
enum Outcome {
    Needle(NeedleGrid),
    Open(OpenReport),
    Choice(ChoiceReport),
}

/// The needle grid on the ranks; `None` on a process that does not report.
pub fn needle(
    args: &EvalArgs,
    model: &EvalModel,
    format: AnswerFormat,
    seed: u64,
    videos: &Path,
    ranks: &Ranks,
) -> Result<Option<NeedleGrid>> {
    Ok(
        match run(args, model, Task::Needle(format), seed, videos, ranks)? {
            Outcome::Needle(grid) => ranks.prints().then_some(grid),
            _ => unreachable!("the needle task gives a grid"),
        },
    )
}

/// The open-ended answers on the ranks; `None` on a process that does not report.
pub fn open(
    args: &EvalArgs,
    model: &EvalModel,
    (decoding, format): (Decoding, AnswerFormat),
    seed: u64,
    videos: &Path,
    ranks: &Ranks,
) -> Result<Option<OpenReport>> {
    Ok(
        match run(
            args,
            model,
            Task::Open(decoding, format),
            seed,
            videos,
            ranks,
        )? {
            Outcome::Open(report) => ranks.prints().then_some(report),
            _ => unreachable!("the open task gives a report"),
        },
    )
}

/// Multiple choice on the ranks; `None` on a process that does not report.
pub fn choice(
    args: &EvalArgs,
    model: &EvalModel,
    rows: &[longview_data::dataset::ChoiceSample],
    ranks: &Ranks,
) -> Result<Option<ChoiceReport>> {
    Ok(
        match run(args, model, Task::Choice(rows), 0, Path::new(""), ranks)? {
            Outcome::Choice(report) => ranks.prints().then_some(report),
            _ => unreachable!("the choice task gives a report"),
        },
    )
}

/// Runs `task` on `args.parallel` sequence-parallel ranks; rank 0's outcome.
fn run(
    args: &EvalArgs,
    model: &EvalModel,
    task: Task<'_>,
    seed: u64,
    videos: &Path,
    ranks: &Ranks,
) -> Result<Outcome> {
    if let Ranks::InProcess { .. } = ranks
        && args.device.device != "cpu"
    {
        bail!(
            "--parallel on `{}`: in-process ranks run on the CPU; for GPUs start one process \
             per rank: `longview eval --nproc {} --device cuda --parallel {}` (a build with \
             --features nccl)",
            args.device.device,
            args.parallel,
            args.parallel
        );
    }
    let job = EvalJob {
        args,
        model,
        task,
        seed,
        videos,
    };
    ranks.run(&job, &args.device)
}

struct EvalJob<'a> {
    args: &'a EvalArgs,
    model: &'a EvalModel,
    task: Task<'a>,
    seed: u64,
    videos: &'a Path,
}

impl RankJob for EvalJob<'_> {
    type Output = Outcome;

    fn run<C: Communicator + Send + Sync + 'static>(
        &self,
        comm: C,
        device: &Device,
        log: &mut dyn FnMut(&str),
    ) -> Result<Self::Output, TrainError> {
        let (args, model) = (self.args, self.model);
        // Evaluation needs no autodiff; the model lives on this rank's device.
        let device = device.clone().inner();
        if !matches!(self.task, Task::Choice(_)) {
            self.videos_on_rank0(&comm, &device)?;
        }
        // Rank 0 records the finished lengths; every rank reads them at the start.
        let writes = comm.rank() == 0;
        let out = self.videos.parent().unwrap_or(Path::new("."));
        let text = &model.config.text;
        let sp = SpInference::with_scheme(
            comm,
            text.head_dim(),
            text.num_heads,
            text.num_kv_heads,
            args.sp_scheme,
        )?;
        let vlm = &model.model;
        let videos = (
            args.frames.as_slice(),
            args.per_depth,
            self.seed,
            self.videos,
        );
        match &self.task {
            &Task::Needle(format) => {
                let mut score = |samples: &[Sample]| {
                    Ok(longview_train::needle::score_by(
                        samples,
                        &model.tokenizer,
                        |s, n| sp.teacher_forced_ids(vlm, s, n, &device),
                    )?)
                };
                let settings = format!("{format:?}");
                let mut progress =
                    crate::eval::progress(args, model, "needle", &settings, out, writes);
                let progress = Some(&mut progress);
                longview_train::eval::needle_grid_with(
                    model, videos, format, progress, log, &mut score,
                )
                .map(Outcome::Needle)
            }
            &Task::Open(decoding, format) => {
                let mut generate = |requests| Ok(sp.generate_batch(vlm, requests, &device)?);
                let settings = format!("{format:?} {decoding:?}");
                let mut progress =
                    crate::eval::progress(args, model, "open", &settings, out, writes);
                longview_train::eval::open_needle_with(
                    model,
                    videos,
                    (decoding, format),
                    Some(&mut progress),
                    &device,
                    log,
                    &mut generate,
                )
                .map(Outcome::Open)
            }
            Task::Choice(rows) => {
                let mut last = |ids: &[u32], visual| Ok(sp.last_logits(vlm, ids, visual, &device)?);
                longview_train::eval::multiple_choice_with(
                    model,
                    rows,
                    args.frames[0],
                    &device,
                    log,
                    &mut last,
                )
                .map(Outcome::Choice)
            }
        }
    }
}

impl EvalJob<'_> {
    /// Rank 0 writes the grid's videos once; the others wait for it, then read them.
    fn videos_on_rank0<C: Communicator>(
        &self,
        comm: &C,
        device: &Device,
    ) -> Result<(), TrainError> {
        if comm.rank() == 0 {
            let side = self.model.config.vision.image_size as u32;
            for &n in &self.args.frames {
                longview_train::data::held_out_videos(
                    self.videos,
                    (side, side),
                    n,
                    self.args.per_depth,
                    self.seed,
                )?;
            }
        }
        comm.all_reduce(Tensor::<1>::zeros([1], device), ReduceOp::Sum)
            .map_err(|e| TrainError::Parallel(format!("barrier after writing the videos: {e}")))?;
        Ok(())
    }
}
