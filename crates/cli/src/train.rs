//! `longview train`: runs a TOML config (default: the debug VLM on generated
//! needle-in-a-haystack videos) and prints a summary.

use std::path::PathBuf;

use anyhow::{Result, bail};
use burn::tensor::Device;
use clap::Args;
use longview_comm::Communicator;
use longview_models::hf::checkpoint::read_vila_text_config;
use longview_parallel::inference::Heads;
use longview_train::mmsp::MmSp;
use longview_train::trainer::train_with;
use longview_train::{Stage, TrainConfig, TrainError, TrainOptions, TrainSummary};

use crate::DeviceArgs;
use crate::ranks::{RankJob, Ranks};

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
    /// Data x sequence parallelism, e.g. `2x2`: MM-SP inside each group of `SP` ranks,
    /// `DP` groups splitting the batch. On the CPU the ranks are threads of this
    /// process.
    /// For `stage = "grpo"`: `1xSP` (rollouts and log-prob passes split over SP ranks).
    /// On GPUs, one process per rank over NCCL: `longview train --nproc N --device
    /// cuda --parallel DPxSP` (DP x SP = N; or under `cargo xtask launch`, torchrun,
    /// SLURM; a build with the `nccl` feature).
    #[arg(long, value_name = "DPxSP")]
    pub parallel: Option<String>,
    /// Start N processes on this machine, one per GPU, each running this command
    /// without `--nproc` as one rank over NCCL (like `cargo xtask launch --nproc N`);
    /// N must equal DP x SP. Needs a build with the `nccl` feature.
    #[arg(long, value_name = "N")]
    pub nproc: Option<usize>,
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
    /// Time each step's parts (master-weight cast, forward+backward, gradient cast,
    /// clipping, optimizer update) between device synchronisations, into
    /// metrics.jsonl's `phases` and the step lines; the syncs slow the step slightly.
    /// Supervised stages only (a GRPO stage reports its own rollout and update times).
    #[arg(long)]
    pub phase_timings: bool,
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
    if crate::ranks::launch_here(args.nproc)? {
        return Ok(());
    }
    let config = load_config(&args)?;
    let parallel = args.parallel.as_deref().map(parse_parallel).transpose()?;
    let ranks = match parallel {
        Some((dp, sp)) => Ranks::resolve(dp * sp, &format!("--parallel {dp}x{sp}"))?,
        None => match longview_launch::ProcessEnv::from_env()? {
            Some(env) => bail!(
                "this process is rank {} of {} launched processes but no --parallel was given: \
                 add --parallel DPxSP with DP x SP = {} (e.g. --parallel 1x{})",
                env.rank,
                env.world_size,
                env.world_size,
                env.world_size
            ),
            None => Ranks::InProcess { world: 1 },
        },
    };
    if let Ranks::InProcess { world } = ranks
        && world > 1
        && args.device.device != "cpu"
    {
        bail!(
            "--parallel on `{}`: in-process ranks run on the CPU; for GPUs start one process \
             per rank: `longview train --nproc {world} --device cuda --parallel ...` (a build \
             with --features nccl)",
            args.device.device
        );
    }
    // --fresh: one process clears the run folder before any rank looks at it; the
    // processes of a launched job do it inside the job (rank 0, then a barrier).
    let fresh_in_job = args.fresh && ranks.process_rank().is_some();
    if args.fresh && !fresh_in_job {
        clear_run(&config.run.out)?;
    }
    let device = match &ranks {
        Ranks::Process(env) => args.device.for_local_rank(env)?,
        Ranks::InProcess { .. } => args.device.device()?,
    };
    let say = |line: &str| {
        if ranks.prints() {
            println!("{line}")
        }
    };
    // `model.size` only names the shape of a random start.
    let model = match &config.model.init_from {
        Some(dir) => format!("model from {}", dir.display()),
        None => format!("{} model", config.model.size),
    };
    say(&format!(
        "longview train: {model}, stage {:?}, {} steps of {} x {} samples, lr {} on {} ({})",
        config.model.stage,
        config.run.steps,
        config.run.batch_size,
        config.run.grad_accum,
        config.optim.lr,
        args.device.device,
        args.device.dtype
    ));
    let matmul_tflops = if args.device.device == "cpu" {
        None
    } else {
        let tflops = crate::matmul_ceiling(&device)?;
        say(&format!(
            "  matmul    {tflops:.1} TFLOP/s measured ({} 8192^3 products, {}): the MFU reference \
             (datasheet peak {:.0})",
            args.device.dtype,
            crate::device::matmul_ceiling_impl(&device),
            crate::device::DATASHEET_PEAK_TFLOPS
        ));
        Some(tflops)
    };
    let options = TrainOptions {
        resume: args.resume.is_some(),
        resume_from: args.resume.clone().flatten(),
        allow_config_change: args.allow_config_change,
        stop_after: None,
        progress: !args.no_progress,
        matmul_tflops,
        memory_budget: None,
        phase_timings: args.phase_timings,
    };
    let where_ranks = match &ranks {
        Ranks::InProcess { .. } => "in-process ranks".to_string(),
        Ranks::Process(env) => format!("processes over NCCL ({} per node)", env.local_world_size),
    };
    if config.model.stage == Stage::Grpo {
        let sp = match parallel {
            None => 1,
            Some((1, sp)) => sp,
            Some((dp, sp)) => bail!(
                "--parallel {dp}x{sp}: GRPO splits sequences (1xSP), not batches; {dp} data-parallel groups are not supported"
            ),
        };
        let setup = RankSetup {
            ranks: &ranks,
            device: &args.device,
            where_ranks: &where_ranks,
            fresh: fresh_in_job,
        };
        return grpo(&config, &options, &device, sp, &setup);
    }
    let summary = match parallel {
        None => longview_train::train(&config, &options, &device, &mut |line| {
            crate::logging::log(line)
        })?,
        Some((dp, sp)) => {
            if !config.run.batch_size.is_multiple_of(dp) {
                bail!(
                    "--parallel {dp}x{sp}: run.batch_size {} must be a multiple of the {dp} data-parallel groups",
                    config.run.batch_size
                );
            }
            say(&format!(
                "  parallel  {dp} data-parallel x {sp} sequence-parallel {where_ranks}"
            ));
            let job = TrainJob(RunJob {
                config: &config,
                options: &options,
                sp,
                heads: attention_heads(&config)?,
                fresh: fresh_in_job,
            });
            ranks.run(&job, &args.device)?
        }
    };
    if !ranks.prints() {
        return Ok(());
    }
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
    let peak_datasheet = crate::device::DATASHEET_PEAK_TFLOPS;
    match matmul_tflops {
        Some(peak) => println!(
            "  compute   {:.2} model TFLOP/s, MFU {:.1}% of the measured matmul rate, {:.1}% of \
             the {peak_datasheet:.0} TFLOP/s datasheet peak (over every step, the first included)",
            summary.model_tflops,
            100.0 * summary.model_tflops / peak,
            100.0 * summary.model_tflops / peak_datasheet
        ),
        None => println!("  compute   {:.4} model TFLOP/s", summary.model_tflops),
    }
    if let Some(steady) = summary.steady {
        let mfu = matmul_tflops.map_or(String::new(), |peak| {
            format!(
                ", MFU {:.1}% of the measured matmul rate, {:.1}% of the datasheet peak",
                100.0 * steady.model_tflops / peak,
                100.0 * steady.model_tflops / peak_datasheet
            )
        });
        // On a GPU the first step also compiles the kernels and tunes the GEMMs.
        let why = if matmul_tflops.is_some() {
            " (which compiles kernels and tunes GEMMs)"
        } else {
            ""
        };
        println!(
            "  steady    the {} steps after the first{why}: median {:.3}s a step, {:.0} \
             tokens/s, {:.4} model TFLOP/s{mfu}",
            steady.steps, steady.median_step_s, steady.tokens_per_s, steady.model_tflops
        );
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

/// A GRPO run (on `sp` sequence-parallel ranks when above 1) and its summary.
fn grpo(
    config: &TrainConfig,
    options: &TrainOptions,
    device: &Device,
    sp: usize,
    setup: &RankSetup,
) -> Result<()> {
    let ranks = setup.ranks;
    let summary = if sp == 1 && ranks.process_rank().is_none() {
        longview_train::grpo::train_grpo(config, options, device, &mut |line| {
            crate::logging::log(line)
        })?
    } else {
        if ranks.prints() {
            println!(
                "  parallel  {sp} sequence-parallel {} (rollouts and log-probs)",
                setup.where_ranks
            );
        }
        let job = GrpoJob(RunJob {
            config,
            options,
            sp,
            heads: attention_heads(config)?,
            fresh: setup.fresh,
        });
        ranks.run(&job, setup.device)?
    };
    if !ranks.prints() {
        return Ok(());
    }
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

/// Where a parallel run's ranks come from and how they start.
struct RankSetup<'a> {
    ranks: &'a Ranks,
    device: &'a crate::DeviceArgs,
    /// "in-process ranks" or "processes over NCCL (...)", for the header.
    where_ranks: &'a str,
    /// `--fresh` left to rank 0 inside the job (a launched job).
    fresh: bool,
}

/// What a rank of a training run needs, whichever stage it runs.
struct RunJob<'a> {
    config: &'a TrainConfig,
    options: &'a TrainOptions,
    sp: usize,
    heads: Heads,
    /// Clear the run folder first (`--fresh` in a launched job).
    fresh: bool,
}

impl RunJob<'_> {
    /// What every rank does before the run: `--fresh` on rank 0, then a barrier.
    fn start<C: Communicator>(&self, comm: &C, device: &Device) -> Result<(), TrainError> {
        if self.fresh {
            clear_run_on_rank0(comm, &self.config.run.out, device)?;
        }
        Ok(())
    }
}

/// GRPO on `sp` ranks: every rank computes the same rollouts and updates, the
/// prefill, decode and log-prob passes split over the group; rank 0 writes.
struct GrpoJob<'a>(RunJob<'a>);

impl RankJob for GrpoJob<'_> {
    type Output = longview_train::grpo::GrpoSummary;

    fn run<C: Communicator + Send + Sync + 'static>(
        &self,
        comm: C,
        device: &Device,
        log: &mut dyn FnMut(&str),
    ) -> Result<Self::Output, TrainError> {
        use longview_train::grpo::passes::SpPasses;
        let job = &self.0;
        job.start(&comm, device)?;
        let reward = job.config.grpo.reward();
        let passes = SpPasses::with_scheme(&comm, job.heads, job.config.run.sp_scheme)?
            .with_recompute(job.config.run.recompute);
        // The runner names the scheme in the attention plan; the passes run it.
        let runner = MmSp::new(comm, job.sp, job.heads.head_dim)?
            .with_scheme(job.heads, job.config.run.sp_scheme)?
            .with_sharded_optimizer(job.config.run.shard_optimizer);
        longview_train::grpo::train_grpo_on(
            job.config,
            job.options,
            device,
            log,
            &reward,
            &runner,
            &passes,
        )
    }
}

/// Training on DP x SP ranks: MM-SP inside each group of `sp`, data parallel across.
struct TrainJob<'a>(RunJob<'a>);

impl RankJob for TrainJob<'_> {
    type Output = TrainSummary;

    fn run<C: Communicator + Send + Sync + 'static>(
        &self,
        comm: C,
        device: &Device,
        log: &mut dyn FnMut(&str),
    ) -> Result<Self::Output, TrainError> {
        let job = &self.0;
        job.start(&comm, device)?;
        let runner = MmSp::new(comm, job.sp, job.heads.head_dim)?
            .with_scheme(job.heads, job.config.run.sp_scheme)?
            .with_recompute(job.config.run.recompute)
            .with_sharded_optimizer(job.config.run.shard_optimizer);
        train_with(job.config, job.options, device, log, &runner)
    }
}

/// Deletes the run folder's checkpoints, metrics and event files (`--fresh`), under
/// the run's lock: not while another process writes this run.
fn clear_run(out: &std::path::Path) -> Result<(), TrainError> {
    std::fs::create_dir_all(out).map_err(io_error(out))?;
    let _lock = longview_train::run_lock::RunLock::acquire(out)?;
    for name in [
        "checkpoints",
        "metrics.jsonl",
        "needle.json",
        "tensorboard",
        "skipped.jsonl",
        "reference",
    ] {
        let path = out.join(name);
        if path.is_dir() {
            std::fs::remove_dir_all(&path).map_err(io_error(&path))?;
        } else if path.exists() {
            std::fs::remove_file(&path).map_err(io_error(&path))?;
        }
    }
    Ok(())
}

fn io_error(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> TrainError {
    let path = path.to_path_buf();
    move |source| TrainError::Io { path, source }
}

/// `--fresh` in a launched job: rank 0 clears the run folder while the others wait.
fn clear_run_on_rank0<C: Communicator>(
    comm: &C,
    out: &std::path::Path,
    device: &Device,
) -> Result<(), TrainError> {
    let cleared = if comm.rank() == 0 {
        clear_run(out)
    } else {
        Ok(())
    };
    // Every rank reaches the barrier, so that a failure on rank 0 cannot hang the rest.
    let failed = f32::from(u8::from(cleared.is_err()));
    let device = device.clone().inner();
    let total = comm
        .all_reduce(
            burn::tensor::Tensor::<1>::from_data([failed], &device),
            longview_comm::ReduceOp::Sum,
        )
        .map_err(|e| TrainError::Parallel(format!("barrier after --fresh: {e}")))?
        .into_scalar::<f32>();
    cleared?;
    if total > 0.0 {
        return Err(TrainError::Parallel(
            "rank 0 could not clear the run folder (--fresh)".into(),
        ));
    }
    Ok(())
}

/// The LLM's attention heads (what sequence-parallel attention is built for), read
/// from `init_from`'s config or the named size.
fn attention_heads(config: &TrainConfig) -> Result<Heads> {
    let text = match longview_train::trainer::init_dir(config)? {
        Some(dir) => read_vila_text_config(&dir)?,
        None => {
            let tokenizer = longview_train::trainer::tokenizer(config)?;
            longview_train::trainer::model_config(config, &tokenizer)?.text
        }
    };
    Ok(Heads {
        head_dim: text.head_dim(),
        q_heads: text.num_heads,
        kv_heads: text.num_kv_heads,
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
    fn fresh_in_a_launched_job_clears_the_run_on_rank_0_before_any_rank_goes_on() {
        let out = std::env::temp_dir().join(format!("longview-cli-fresh-{}", std::process::id()));
        std::fs::create_dir_all(out.join("checkpoints/step-000002")).unwrap();
        std::fs::write(out.join("metrics.jsonl"), "{}\n").unwrap();
        std::fs::write(out.join("keep.txt"), "not the run's").unwrap();
        let comms = longview_comm::LocalWorld::communicators(2);
        std::thread::scope(|scope| {
            let handles: Vec<_> = comms
                .into_iter()
                .map(|comm| {
                    let out = &out;
                    scope.spawn(move || {
                        clear_run_on_rank0(&comm, out, &Device::flex()).unwrap();
                        // After the barrier every rank sees the cleared folder.
                        assert!(!out.join("checkpoints").exists());
                        assert!(!out.join("metrics.jsonl").exists());
                    })
                })
                .collect();
            for h in handles {
                h.join().unwrap();
            }
        });
        assert!(out.join("keep.txt").exists());
        std::fs::remove_dir_all(&out).unwrap();
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
}
