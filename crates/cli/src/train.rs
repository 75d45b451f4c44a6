//! `longview train`: runs a TOML config (default: the debug VLM on generated
//! needle-in-a-haystack videos) and prints a summary.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use clap::Args;
use longview_comm::{Communicator, LocalComm, LocalWorld};
use longview_models::hf::checkpoint::read_vila_text_config;
use longview_train::mmsp::MmSp;
use longview_train::trainer::train_with;
use longview_train::{Stage, TrainConfig, TrainError, TrainOptions, TrainSummary};

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
    /// Data x sequence parallelism on in-process ranks (threads on this machine), e.g.
    /// `2x2`: MM-SP inside each group of `SP` ranks, `DP` groups splitting the batch.
    /// For `stage = "grpo"`: `1xSP` (rollouts and log-prob passes split over SP ranks).
    /// (Multi-GPU NCCL training is not wired in yet.)
    #[arg(long, value_name = "DPxSP")]
    pub parallel: Option<String>,
    /// Continue the run: from the newest checkpoint in the run folder, or from the
    /// checkpoint folder given (e.g. runs/x/checkpoints/step-000500).
    #[arg(long, value_name = "CHECKPOINT", num_args = 0..=1)]
    pub resume: Option<Option<PathBuf>>,
    /// With --resume: accept a config that differs from the checkpoint's in keys that
    /// change the run (batch, model, data, optimizer); the differences are printed.
    #[arg(long, requires = "resume")]
    pub allow_config_change: bool,
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
    // The TOML's run.seed holds unless --seed is given.
    if let Some(seed) = args.device.seed {
        config.run.seed = seed;
    }
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
        // Not while another process writes this run: its checkpoint in progress would go.
        std::fs::create_dir_all(&config.run.out)
            .with_context(|| format!("creating {}", config.run.out.display()))?;
        let _lock = longview_train::run_lock::RunLock::acquire(&config.run.out)?;
        for name in [
            "checkpoints",
            "metrics.jsonl",
            "needle.json",
            "tensorboard",
            "skipped.jsonl",
            "reference",
        ] {
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
    let matmul_tflops = if args.device.device == "cpu" {
        None
    } else {
        let tflops = crate::matmul_ceiling(&device)?;
        println!(
            "  matmul    {tflops:.1} TFLOP/s measured ({} 8192^3 products, {}): the MFU reference \
             (datasheet peak {:.0})",
            args.device.dtype,
            crate::device::matmul_ceiling_impl(&device),
            crate::device::DATASHEET_PEAK_TFLOPS
        );
        Some(tflops)
    };
    let options = TrainOptions {
        resume: args.resume.is_some(),
        resume_from: args.resume.clone().flatten(),
        allow_config_change: args.allow_config_change,
        stop_after: None,
        progress: !args.no_progress,
        matmul_tflops,
    };
    if config.model.stage == Stage::Grpo {
        let sp = match &args.parallel {
            None => 1,
            Some(spec) => match parse_parallel(spec)? {
                (1, sp) if args.device.device == "cpu" => sp,
                (1, _) => bail!(
                    "--parallel runs in-process ranks on the CPU; multi-GPU GRPO is not wired in yet"
                ),
                (dp, _) => bail!(
                    "--parallel {spec}: GRPO splits sequences (1xSP), not batches; {dp} data-parallel groups are not supported"
                ),
            },
        };
        return grpo(&config, &options, &device, sp);
    }
    let summary = match &args.parallel {
        None => longview_train::train(&config, &options, &device, &mut |line| {
            crate::logging::log(line)
        })?,
        Some(spec) => {
            let (dp, sp) = parse_parallel(spec)?;
            if !config.run.batch_size.is_multiple_of(dp) {
                bail!(
                    "--parallel {spec}: run.batch_size {} must be a multiple of the {dp} data-parallel groups",
                    config.run.batch_size
                );
            }
            if args.device.device != "cpu" {
                bail!(
                    "--parallel runs in-process ranks on the CPU; multi-GPU training is not wired in yet"
                );
            }
            println!("  parallel  {dp} data-parallel x {sp} sequence-parallel in-process ranks");
            parallel(&config, &options, dp, sp)?
        }
    };
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
        "  steps     {} -> {} in {:.1}s, {:.0} tokens/s",
        summary.first_step, summary.last_step, summary.elapsed_s, summary.tokens_per_s,
    );
    println!("  data      {}", summary.data);
    match matmul_tflops {
        Some(peak) => println!(
            "  compute   {:.2} model TFLOP/s, MFU {:.1}% of the measured matmul rate",
            summary.model_tflops,
            100.0 * summary.model_tflops / peak
        ),
        None => println!("  compute   {:.4} model TFLOP/s", summary.model_tflops),
    }
    println!("  attention {}", summary.attention);
    if let Some(mib) = summary.peak_device_mib {
        println!(
            "  memory    {:.1} GiB peak held by the device allocator",
            mib / 1024.0
        );
    }
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

/// A GRPO run (on `sp` sequence-parallel in-process ranks when above 1) and its
/// summary.
fn grpo(config: &TrainConfig, options: &TrainOptions, device: &Device, sp: usize) -> Result<()> {
    let summary = if sp == 1 {
        longview_train::grpo::train_grpo(config, options, device, &mut |line| {
            crate::logging::log(line)
        })?
    } else {
        println!("  parallel  {sp} sequence-parallel in-process ranks (rollouts and log-probs)");
        grpo_parallel(config, options, sp)?
    };
    let reports = &summary.reports;
    println!("summary");
    println!(
        "  steps     {} -> {} in {:.1}s ({} responses of {} prompts per step)",
        summary.first_step,
        summary.last_step,
        summary.elapsed_s,
        config.grpo.group_size,
        config.run.batch_size
    );
    let window = (reports.len() / 4).max(1);
    if !reports.is_empty() {
        let mean = |r: &[longview_train::grpo::step::StepReport]| {
            r.iter().map(|x| x.reward_mean).sum::<f32>() / r.len().max(1) as f32
        };
        println!(
            "  reward    mean of the first {window} steps {:.3} -> mean of the last {window} {:.3}",
            mean(&reports[..window]),
            mean(&reports[reports.len() - window..])
        );
        let (rollout, update): (f64, f64) = reports
            .iter()
            .fold((0.0, 0.0), |(a, b), r| (a + r.rollout_s, b + r.update_s));
        println!("  time      rollouts {rollout:.1}s, updates {update:.1}s");
    }
    if let (Some(before), Some(after)) = (summary.eval_before, summary.eval_after) {
        println!(
            "  held-out  greedy answers right {:.1}% -> {:.1}%",
            100.0 * before,
            100.0 * after
        );
    }
    if let Some(dir) = &summary.checkpoint {
        println!("  saved     {}", dir.display());
    }
    println!(
        "  metrics   {}",
        config.run.out.join("metrics.jsonl").display()
    );
    Ok(())
}

/// GRPO on `sp` in-process ranks: every rank computes the same rollouts and updates,
/// the prefill, decode and log-prob passes split over the group; rank 0 writes.
fn grpo_parallel(
    config: &TrainConfig,
    options: &TrainOptions,
    sp: usize,
) -> Result<longview_train::grpo::GrpoSummary> {
    use longview_train::grpo::passes::SpPasses;
    let head_dim = head_dim(config)?;
    let reward = config.grpo.reward();
    on_ranks(sp, |comm, log| {
        let passes = SpPasses::new(&comm, head_dim)?;
        let runner = MmSp::new(comm, sp, head_dim)?;
        let device = Device::flex().autodiff();
        longview_train::grpo::train_grpo_on(
            config, options, &device, log, &reward, &runner, &passes,
        )
    })
}

/// Runs `rank(comm, log)` on `world` in-process ranks, one thread each (`log` prints
/// on rank 0 only), and returns rank 0's result; the first failing rank's error
/// otherwise, naming it.
fn on_ranks<T: Send>(
    world: usize,
    rank: impl Fn(LocalComm, &mut dyn FnMut(&str)) -> Result<T, TrainError> + Sync,
) -> Result<T> {
    let comms = LocalWorld::communicators(world);
    let results: Vec<Result<T, TrainError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                let rank = &rank;
                scope.spawn(move || {
                    let index = comm.rank();
                    let mut log = |line: &str| {
                        if index == 0 {
                            crate::logging::line(Some(index), line)
                        }
                    };
                    rank(comm, &mut log)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                // A failed collective inside an autodiff backward can only panic: its
                // message names the rank and the collective.
                h.join().unwrap_or_else(|payload| {
                    Err(TrainError::Parallel(format!(
                        "panicked: {}",
                        panic_message(&*payload)
                    )))
                })
            })
            .collect()
    });
    let mut first = None;
    for (r, result) in results.into_iter().enumerate() {
        match result {
            Ok(value) if r == 0 => first = Some(value),
            Ok(_) => {}
            Err(e) => bail!("rank {r}: {e}"),
        }
    }
    Ok(first.expect("rank 0 reports"))
}

/// The text of a panic payload (`panic!` with a message gives a `String` or `&str`).
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(no message)".into())
}

/// The LLM's head dimension (what sequence-parallel attention is built for), read
/// from `init_from`'s config or the named size.
fn head_dim(config: &TrainConfig) -> Result<usize> {
    Ok(match longview_train::trainer::init_dir(config)? {
        Some(dir) => read_vila_text_config(&dir)?.head_dim(),
        None => {
            let tokenizer = longview_train::trainer::tokenizer(config)?;
            longview_train::trainer::model_config(config, &tokenizer)?
                .text
                .head_dim()
        }
    })
}

fn parse_parallel(spec: &str) -> Result<(usize, usize)> {
    let parsed = spec
        .split_once(['x', 'X'])
        .and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?)));
    match parsed {
        Some((dp, sp)) if dp >= 1 && sp >= 1 => Ok((dp, sp)),
        _ => bail!("--parallel `{spec}`: expected DPxSP with positive numbers, e.g. 1x2 or 2x2"),
    }
}

/// One thread per rank over the in-process communicator; rank 0 reports.
fn parallel(
    config: &TrainConfig,
    options: &TrainOptions,
    dp: usize,
    sp: usize,
) -> Result<TrainSummary> {
    let head_dim = head_dim(config)?;
    on_ranks(dp * sp, |comm, log| {
        let runner = MmSp::new(comm, sp, head_dim)?.with_recompute(config.run.recompute);
        let device = Device::flex().autodiff();
        train_with(config, options, &device, log, &runner)
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: TrainArgs,
    }

    fn config_with_seed(args: &[&str], toml_seed: u64) -> TrainConfig {
        let dir = std::env::temp_dir().join(format!("longview-cli-seed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("seed-{toml_seed}-{}.toml", args.len()));
        let mut config = TrainConfig::default();
        config.run.seed = toml_seed;
        std::fs::write(&path, config.to_toml()).unwrap();
        let mut argv = vec!["train", "--config", path.to_str().unwrap()];
        argv.extend_from_slice(args);
        load_config(&Wrapper::parse_from(argv).args).unwrap()
    }

    #[test]
    fn the_config_seed_holds_unless_the_flag_is_given() {
        assert_eq!(
            config_with_seed(&[], 7).run.seed,
            7,
            "run.seed from the TOML"
        );
        assert_eq!(
            config_with_seed(&["--seed", "3"], 7).run.seed,
            3,
            "--seed wins"
        );
        assert_eq!(
            config_with_seed(&["--seed", "0"], 7).run.seed,
            0,
            "an explicit 0 too"
        );
    }

    #[test]
    fn a_rank_panic_is_reported_with_its_message() {
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let formatted = std::panic::catch_unwind(|| panic!("rank {}: all_gather gave up", 1));
        let literal = std::panic::catch_unwind(|| panic!("plain text"));
        std::panic::set_hook(hook);
        assert_eq!(
            panic_message(&*formatted.unwrap_err()),
            "rank 1: all_gather gave up"
        );
        assert_eq!(panic_message(&*literal.unwrap_err()), "plain text");
    }
}
