//! `longview train`: runs a TOML config (default: the debug VLM on generated
//! needle-in-a-haystack videos) and prints a summary.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use longview_train::{TrainConfig, TrainOptions};

use crate::DeviceArgs;

#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Run config (TOML, see configs/). Without it: the default debug run.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Overrides run.out (folder of checkpoints and metrics).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Overrides run.steps.
    #[arg(long)]
    pub steps: Option<usize>,
    /// Overrides optim.lr.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Overrides data.frames.
    #[arg(long)]
    pub frames: Option<usize>,
    /// Continue from the newest checkpoint in the run folder.
    #[arg(long)]
    pub resume: bool,
    /// Delete the run folder's checkpoints and metrics first (start over).
    #[arg(long, conflicts_with = "resume")]
    pub fresh: bool,
    /// No progress bar (logs only).
    #[arg(long)]
    pub no_progress: bool,
}

pub fn load_config(args: &TrainArgs) -> Result<TrainConfig> {
    let mut config = match &args.config {
        Some(path) => TrainConfig::from_file(path)?,
        None => TrainConfig::default(),
    };
    if let Some(out) = &args.out {
        config.run.out = out.clone();
    }
    if let Some(steps) = args.steps {
        config.run.steps = steps;
        config.optim.warmup_steps = config.optim.warmup_steps.min(steps);
    }
    if let Some(lr) = args.lr {
        config.optim.lr = lr;
    }
    if let Some(frames) = args.frames {
        config.data.frames = frames;
        config.data.min_frames = config.data.min_frames.min(frames);
    }
    config.run.seed = args.device.seed;
    let source = args
        .config
        .as_ref()
        .map_or("default".to_string(), |p| p.display().to_string());
    config.validate(&format!("{source} (with command-line overrides)"))?;
    Ok(config)
}

pub fn run(args: TrainArgs) -> Result<()> {
    let config = load_config(&args)?;
    if args.fresh {
        for name in ["checkpoints", "metrics.jsonl", "needle.json"] {
            let path = config.run.out.join(name);
            if path.is_dir() {
                std::fs::remove_dir_all(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
            } else if path.exists() {
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
            }
        }
    }
    let device = args.device.device()?;
    println!(
        "longview train: {} model, stage {:?}, {} steps of {} x {} samples, lr {} on {} ({})",
        config.model.size,
        config.model.stage,
        config.run.steps,
        config.run.batch_size,
        config.run.grad_accum,
        config.optim.lr,
        args.device.device,
        args.device.dtype
    );
    let options = TrainOptions {
        resume: args.resume,
        stop_after: None,
        progress: !args.no_progress,
    };
    let summary =
        longview_train::train(&config, &options, &device, &mut |line| println!("  {line}"))?;
    let losses = &summary.losses;
    let window = 10.min(losses.len()).max(1);
    let head: f32 = losses.iter().take(window).sum::<f32>() / window as f32;
    let tail: f32 = losses.iter().rev().take(window).sum::<f32>() / window as f32;
    println!("summary");
    println!(
        "  model     {:.2}M parameters, {:.2}M trainable ({:?})",
        summary.params as f64 / 1e6,
        summary.trainable_params as f64 / 1e6,
        config.trainable()
    );
    println!(
        "  steps     {} -> {} in {:.1}s, {:.0} tokens/s on {} training videos",
        summary.first_step,
        summary.last_step,
        summary.elapsed_s,
        summary.tokens_per_s,
        summary.train_samples
    );
    println!(
        "  loss      mean of the first {window} steps {head:.4} -> mean of the last {window} {tail:.4}"
    );
    if let Some(dir) = &summary.checkpoint {
        println!("  saved     {}", dir.display());
    }
    println!(
        "  metrics   {}",
        config.run.out.join("metrics.jsonl").display()
    );
    if let Some(report) = &summary.eval {
        println!("held-out needle-in-a-haystack (teacher-forced, exact match)");
        print!("{}", report.table());
    }
    if losses.len() >= 20 && tail >= head {
        bail!("the loss did not fall ({head:.4} -> {tail:.4}): training is broken");
    }
    Ok(())
}
