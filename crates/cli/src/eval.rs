//! `longview eval`: scores a saved model on the needle-in-a-haystack grid and writes a
//! table, JSON and a heatmap next to it; or generates open-ended answers (`--task
//! open`) or ranks multiple-choice options (`--task choice`). On one device, or with
//! `--parallel SP` on sequence-parallel ranks (`crate::eval_parallel`).

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;

use longview_train::AnswerFormat;
use longview_train::eval::EvalModel;
use longview_train::generate::Decoding;

use crate::DeviceArgs;
use crate::eval_parallel;
use crate::ranks::Ranks;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnswerFormatArg {
    Auto,
    Plain,
    Think,
}

/// The record of the haystack lengths `task` has finished under `out`
/// (`<task>.progress.json`), from which an interrupted evaluation resumes; keyed by
/// the checkpoint folder, its weight files' sizes and times, the videos per depth,
/// the seed and `settings`. `writes`: whether this process records it (one rank).
pub fn progress(
    args: &EvalArgs,
    model: &EvalModel,
    task: &str,
    settings: &str,
    out: &std::path::Path,
    writes: bool,
) -> longview_train::eval::EvalProgress {
    let key = format!(
        "{task} | {} | {} | {} per depth | seed {} | {settings}",
        model.dir.display(),
        longview_train::eval_progress::weights_identity(&model.dir),
        args.per_depth,
        args.device.seed()
    );
    let path = out.join(format!("{task}.progress.json"));
    let progress = longview_train::eval::EvalProgress::open(&path, key, writes);
    let done = progress.lengths();
    if writes && !done.is_empty() {
        println!(
            "  resuming: {done:?} frames scored before, in {} (delete it to score them again)",
            path.display()
        );
    }
    progress
}

/// What the headers say of a think-format evaluation.
fn format_label(format: AnswerFormat) -> &'static str {
    match format {
        AnswerFormat::Plain => "",
        AnswerFormat::Think => ", answers as <think>...</think><answer>NN</answer>",
    }
}

/// The answer format `--answer-format` resolves to for `model`.
pub fn answer_format(args: &EvalArgs, model: &EvalModel) -> Result<AnswerFormat> {
    Ok(match args.answer_format {
        AnswerFormatArg::Plain => AnswerFormat::Plain,
        AnswerFormatArg::Think => AnswerFormat::Think,
        AnswerFormatArg::Auto => {
            longview_train::eval::trained_answer_format(&model.dir)?.unwrap_or_default()
        }
    })
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub device: DeviceArgs,
    /// A run folder (its latest checkpoint), a checkpoint folder, or a VILA model folder.
    #[arg(long, default_value = "runs/debug-haystack")]
    pub checkpoint: PathBuf,
    /// What to evaluate: `needle` (haystack length x depth grid, teacher-forced as
    /// LongVILA scores it), `open` (the same videos, answers generated freely with the
    /// KV cache: greedy, or top-p with --top-p) or `choice` (VideoMME-style
    /// multiple-choice JSONL given by --data).
    #[arg(long, default_value = "needle")]
    pub task: String,
    /// The JSONL file of `--task choice` (`question`, `options`, `answer` letter,
    /// `video` or `videoID`; videos relative to the file).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Haystack lengths (frames), comma separated; for `choice`, the first value is the
    /// number of frames sampled uniformly from every video.
    #[arg(long, value_delimiter = ',', default_value = "32,64,128")]
    pub frames: Vec<usize>,
    /// Videos per (length, depth) cell.
    #[arg(long, default_value_t = 4)]
    pub per_depth: usize,
    /// Where results go (default: `<checkpoint>/eval`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// How the needle answers are written: `plain` (the number), `think`
    /// (`<think>...</think><answer>NN</answer>`, CoT-SFT and GRPO runs: `needle`
    /// teacher-forces that whole reply, `open` scores the number inside `<answer>`),
    /// or `auto`: the `data.answer_format` the checkpoint's run trained with (its
    /// trainer.json), plain for a folder without one.
    #[arg(long, value_enum, default_value = "auto")]
    pub answer_format: AnswerFormatArg,
    /// `--task open`: sample from the smallest set of tokens whose probability
    /// reaches P (nucleus sampling, seeded by --seed) instead of greedy decoding.
    #[arg(long, value_name = "P")]
    pub top_p: Option<f64>,
    /// `--task open` with --top-p: divides the logits before the softmax.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Any task on this many sequence-parallel ranks: every prompt prefilled with
    /// sequence-parallel attention (--sp-scheme), then the needle's answer rows, the
    /// open answers' tokens or the choice's next token computed against the KV cache
    /// sharded over the ranks. The scores equal one device's. In-process
    /// ranks (CPU threads), or on GPUs one process per rank over NCCL: `longview eval
    /// --nproc SP --device cuda --parallel SP` (a build with the `nccl` feature).
    #[arg(long, default_value_t = 1, value_name = "SP")]
    pub parallel: usize,
    /// Start N processes on this machine, one per GPU, each running this command
    /// without `--nproc` as one rank over NCCL; N must equal --parallel. Needs a
    /// build with the `nccl` feature.
    #[arg(long, value_name = "N")]
    pub nproc: Option<usize>,
    /// With --parallel: the prefill's sequence-parallel attention: `ring` (zigzag),
    /// `ulysses` (the ranks must suit the heads) or `2d:U` (Ulysses inside groups of
    /// U ranks, ring across them). Decoding is the same for all.
    #[arg(long, default_value = "ring", value_name = "SCHEME")]
    pub sp_scheme: longview_parallel::inference::SpScheme,
    /// Prompt rows per prefill chunk (one device): activation memory is bounded by
    /// the chunk, only the KV cache grows with the prompt; 0 runs each prompt in one
    /// pass.
    #[arg(long, default_value_t = longview_infer::prefill::DEFAULT_CHUNK, value_name = "ROWS")]
    pub prefill_chunk: usize,
}

pub fn run(args: EvalArgs) -> Result<()> {
    if crate::ranks::launch_here(args.nproc)? {
        return Ok(());
    }
    if args.frames.is_empty() || args.frames.contains(&0) || args.per_depth == 0 {
        bail!("--frames needs positive lengths and --per-depth at least 1");
    }
    if args.parallel == 0 {
        bail!("--parallel 0: evaluation runs on at least 1 rank");
    }
    let choice_data = match args.task.as_str() {
        "needle" | "open" => None,
        "choice" => match &args.data {
            Some(path) => Some(path.clone()),
            None => bail!("--task choice needs --data FILE.jsonl (VideoMME-style rows)"),
        },
        other => bail!("--task `{other}`: expected `needle`, `open` or `choice`"),
    };
    // Settings that would be silently ignored are refused.
    if args.top_p.is_some() && args.task != "open" {
        bail!(
            "--top-p samples the answers of --task open; `{}` scores without sampling",
            args.task
        );
    }
    if args.answer_format != AnswerFormatArg::Auto && args.task == "choice" {
        bail!(
            "--answer-format is for the needle videos (needle, open); --task choice ranks \
             the option letters"
        );
    }
    if args.top_p.is_none() && args.temperature != 1.0 {
        bail!(
            "--temperature {} divides the logits of top-p sampling: add --top-p P (greedy \
             decoding ignores it)",
            args.temperature
        );
    }
    if args.parallel > 1 && args.prefill_chunk != longview_infer::prefill::DEFAULT_CHUNK {
        bail!(
            "--prefill-chunk is for one device; with --parallel {} every prompt is sharded \
             over the ranks instead",
            args.parallel
        );
    }
    let decoding = match args.top_p {
        None => Decoding::Greedy,
        Some(top_p) => Decoding::TopP {
            top_p,
            temperature: args.temperature,
            seed: args.device.seed(),
        },
    };
    if let Err(message) = decoding.validate() {
        bail!("--top-p/--temperature: {message}");
    }
    let ranks = match args.parallel {
        1 => Ranks::resolve(1, "--parallel 1")?,
        sp => Ranks::resolve(sp, &format!("--parallel {sp}"))?,
    };
    // Evaluation keeps no autodiff graph: on an autodiff device every forward pass
    // would keep its graph (and its activations) alive (measured: 130 MB more per
    // 128-frame video of the default run, killed by the OOM killer at 1024 frames).
    let device = match &ranks {
        Ranks::Process(env) => args.device.for_local_rank(env)?,
        Ranks::InProcess { .. } => args.device.device()?,
    }
    .without_autodiff();
    // The checkpoint's folder is checked, then the output folder made, before the
    // model loads (a read-only checkpoint fails in seconds, not after the load).
    longview_train::eval::resolve_model_dir(&args.checkpoint)?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| args.checkpoint.join("eval"));
    std::fs::create_dir_all(&out).map_err(|e| {
        anyhow::anyhow!(
            "cannot create the output folder {} ({e}); pass --out DIR",
            out.display()
        )
    })?;
    let model = longview_train::eval::load(&args.checkpoint, &device)?;
    // Sequence-parallel ranks (threads, or this process as one of a launch), or one
    // device.
    let parallel = (args.parallel > 1 || ranks.process_rank().is_some()).then_some(&ranks);
    if let Some(path) = choice_data {
        return choice(&args, &model, &path, &out, &device, parallel);
    }
    // Read once (from the checkpoint's trainer.json under `auto`).
    let format = answer_format(&args, &model)?;
    if args.task == "open" {
        return open(&args, &model, (decoding, format), &out, &device, parallel);
    }
    if ranks.prints() {
        println!(
            "longview eval: needle in a haystack, {} ({}){}",
            model.dir.display(),
            grid_label(&args),
            format_label(format)
        );
    }
    // The eval videos use their own seed, never the training set's.
    let seed = args.device.seed() + 424_242;
    let videos = out.join("videos");
    let grid = if let Some(ranks) = parallel {
        match eval_parallel::needle(&args, &model, format, seed, &videos, ranks)? {
            Some(grid) => grid,
            None => return Ok(()),
        }
    } else {
        let mut progress = progress(&args, &model, "needle", &format!("{format:?}"), &out, true);
        longview_train::eval::needle_grid_with(
            &model,
            (&args.frames, args.per_depth, seed, &videos),
            format,
            Some(&mut progress),
            &mut |line| crate::logging::log(line),
            &mut |samples| {
                let chunk = args.prefill_chunk;
                Ok(longview_train::needle::score_chunked(
                    &model.model,
                    samples,
                    &model.tokenizer,
                    chunk,
                    &device,
                )?)
            },
        )?
    };
    let table = grid.table();
    std::fs::write(out.join("needle.md"), &table)?;
    std::fs::write(
        out.join("needle.json"),
        serde_json::to_string_pretty(&grid)?,
    )?;
    let title = format!("needle in a haystack: {}", model.dir.display());
    grid.write_heatmap(&out.join("needle.png"), &title)?;
    println!("{table}");
    println!(
        "  wrote {}, needle.json and needle.png",
        out.join("needle.md").display()
    );
    Ok(())
}

fn choice(
    args: &EvalArgs,
    model: &longview_train::eval::EvalModel,
    path: &std::path::Path,
    out: &std::path::Path,
    device: &burn::tensor::Device,
    parallel: Option<&Ranks>,
) -> Result<()> {
    let prints = parallel.is_none_or(Ranks::prints);
    let rows = longview_data::dataset::read_multiple_choice(
        path,
        &longview_data::dataset::ReadOptions::default(),
    )?;
    if prints {
        println!(
            "longview eval: multiple choice, {} ({}; {} frames a video{})",
            model.dir.display(),
            rows.summary(),
            args.frames[0],
            sequence_parallel_label(args, parallel)
        );
    }
    let samples: Vec<_> = rows.samples().cloned().collect();
    if samples.is_empty() {
        bail!("{}: no usable rows", path.display());
    }
    let report = match parallel {
        Some(ranks) => match eval_parallel::choice(args, model, &samples, ranks)? {
            Some(report) => report,
            None => return Ok(()),
        },
        None => longview_train::eval::multiple_choice(
            model,
            &samples,
            args.frames[0],
            device,
            &mut |line| crate::logging::log(line),
        )?,
    };
    std::fs::write(
        out.join("choice.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    let chance = samples
        .iter()
        .map(|s| 1.0 / s.options.len() as f64)
        .sum::<f64>()
        / samples.len() as f64;
    println!(
        "  accuracy {:.1}% ({}/{} scored), chance {:.1}%",
        100.0 * report.accuracy(),
        report.correct,
        report.total,
        100.0 * chance
    );
    // Rows that could not be read or decoded are not dropped silently: they count as
    // wrong in the second figure.
    let unusable = rows.skipped.len() + report.skipped.len();
    if unusable > 0 {
        let all = report.total + unusable;
        println!(
            "  skipped  {unusable} rows ({} unreadable lines, {} undecodable videos): {:.1}% ({}/{all}) counting them as wrong",
            rows.skipped.len(),
            report.skipped.len(),
            100.0 * report.correct as f64 / all as f64,
            report.correct
        );
        for reason in &report.skipped {
            println!("    {reason}");
        }
    }
    for (duration, c, t) in &report.per_duration {
        println!("  {duration:<8} {c}/{t}");
    }
    println!("  wrote {}", out.join("choice.json").display());
    Ok(())
}

fn open(
    args: &EvalArgs,
    model: &longview_train::eval::EvalModel,
    (decoding, format): (Decoding, AnswerFormat),
    out: &std::path::Path,
    device: &burn::tensor::Device,
    parallel: Option<&Ranks>,
) -> Result<()> {
    let prints = parallel.is_none_or(Ranks::prints);
    if prints {
        println!(
            "longview eval: open-ended needle answers ({decoding:?}), {} ({}{}){}",
            model.dir.display(),
            grid_label(args),
            sequence_parallel_label(args, parallel),
            format_label(format)
        );
    }
    let (seed, videos) = (args.device.seed() + 424_242, out.join("videos"));
    let report = match parallel {
        Some(ranks) => {
            match eval_parallel::open(args, model, (decoding, format), seed, &videos, ranks)? {
                Some(report) => report,
                None => return Ok(()),
            }
        }
        None => longview_train::eval::open_needle(
            model,
            &args.frames,
            args.per_depth,
            seed,
            &videos,
            decoding,
            format,
            Some(&mut progress(
                args,
                model,
                "open",
                &format!("{format:?} {decoding:?}"),
                out,
                true,
            )),
            device,
            &mut |line| crate::logging::log(line),
        )?,
    };
    let path = out.join("open.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    for a in report.answers.iter().filter(|a| !a.correct).take(5) {
        println!(
            "  wrong: {} frames, depth {:.1}: expected {:?}, generated {:?}",
            a.frames, a.depth, a.answer, a.generated
        );
    }
    println!(
        "  exact answers {:.1}% ({}/{}), chance 1.1%",
        100.0 * report.accuracy(),
        report.correct,
        report.total
    );
    println!("  wrote {}", path.display());
    Ok(())
}

/// `, sequence-parallel over 2 ranks (ring)` under --parallel, else nothing.
fn sequence_parallel_label(args: &EvalArgs, parallel: Option<&Ranks>) -> String {
    match parallel {
        Some(_) => format!(
            ", sequence-parallel over {} ranks ({})",
            args.parallel, args.sp_scheme
        ),
        None => String::new(),
    }
}

/// `32/64/128 frames x 6 depths x 4 videos`.
fn grid_label(args: &EvalArgs) -> String {
    let frames: Vec<String> = args.frames.iter().map(|f| f.to_string()).collect();
    format!(
        "{} frames x 6 depths x {} videos",
        frames.join("/"),
        args.per_depth
    )
}
