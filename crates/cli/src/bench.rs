//! Forward+backward throughput of a named model size on generated inputs.
//!
//! Reports LLM tokens/s and an estimated model FLOP rate: linear layers count
//! 6 x params x tokens (forward 2, backward 4), attention 4 x seq^2 x width per layer
//! forward (halved for causal LLM attention) and twice that backward. The timer stops
//! after `Device::sync`, and warm-up iterations (JIT compilation, autotuning) are not
//! timed.

use std::time::Instant;

use anyhow::Result;
use burn::module::Module;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::demo::named_config;
use crate::{DeviceArgs, synthetic};
use longview_models::attention::{AttentionImpl, flash_available};

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Model size: debug, small, 1.5b or 7b.
    #[arg(long, default_value = "debug")]
    pub size: String,
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Frames per sample (each frame adds tokens_per_frame + 1 LLM tokens).
    #[arg(long, default_value_t = 8)]
    pub frames: usize,
    /// Text tokens per sample besides the visual ones (half of them supervised).
    #[arg(long, default_value_t = 64)]
    pub text_tokens: usize,
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    /// Also write the result as one JSON line to this file (appended).
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// Attention of the vision encoder and the LLM: `reference` (tensor ops) or
    /// `flash` (longview's CubeCL kernels; CUDA builds only).
    #[arg(long, default_value = "reference")]
    pub attention: String,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let mut config = named_config(&args.size)?;
    if args.batch == 0 || args.iters == 0 {
        anyhow::bail!("--batch and --iters must be at least 1");
    }
    let device = args.device.device()?;
    let attention = match args.attention.as_str() {
        "reference" => AttentionImpl::Reference,
        "flash" if flash_available(&device) => AttentionImpl::Flash,
        "flash" => anyhow::bail!(
            "--attention flash needs a CUDA device and a build with `--features cuda` \
             (this run: {:?})",
            args.device.device
        ),
        other => anyhow::bail!("--attention `{other}`: expected reference or flash"),
    };
    config.vision.attention = attention;
    config.text.attention = attention;
    let model = config.init(&device);
    // Weights and gradients, plus headroom for activations.
    crate::check_cpu_memory(&args.device, model.num_params(), 3)?;
    let answer = args.text_tokens / 2;
    let batch = synthetic::batch(
        &config,
        args.batch,
        args.frames,
        args.text_tokens - answer,
        answer,
        args.device.seed,
        &device,
    )?;
    let tokens = args.batch * batch.seq_len;

    let step = || -> Result<()> {
        let loss = model.loss(batch.input.clone(), batch.labels.clone())?;
        let _grads = loss.backward();
        device
            .sync()
            .map_err(|e| anyhow::anyhow!("device sync failed: {e:?}"))?;
        Ok(())
    };
    let bar = ProgressBar::new((args.warmup + args.iters) as u64);
    bar.set_style(
        ProgressStyle::with_template("  {msg} [{bar:30}] {pos}/{len}").expect("valid template"),
    );
    bar.set_message("warm-up");
    for _ in 0..args.warmup {
        step()?;
        bar.inc(1);
    }
    bar.set_message("timed");
    let start = Instant::now();
    for _ in 0..args.iters {
        step()?;
        bar.inc(1);
    }
    let seconds = start.elapsed().as_secs_f64() / args.iters.max(1) as f64;
    bar.finish_and_clear();

    let flops = longview_models::vila::train_flops(
        &model,
        &config,
        &vec![batch.seq_len; args.batch],
        batch.frames,
    );
    let memory = device.memory_pool_usage().map(|m| m.bytes_reserved);

    let result = json!({
        "size": args.size, "device": args.device.device, "dtype": args.device.dtype,
        "batch": args.batch, "frames": batch.frames, "seq_len": batch.seq_len,
        "llm_tokens": tokens, "seconds_per_step": seconds,
        "tokens_per_second": tokens as f64 / seconds,
        "tflops": flops / seconds / 1e12,
        "reserved_bytes": memory,
    });
    println!("{TABLE_HEADER}");
    println!(
        "| {} | {} | {} | {}x{} | {} | {:.3} | {:.0} | {:.2} | {} |",
        args.size,
        args.device.device,
        args.device.dtype,
        args.batch,
        batch.seq_len,
        batch.frames,
        seconds,
        tokens as f64 / seconds,
        flops / seconds / 1e12,
        memory.map_or("n/a".to_string(), |b| format!(
            "{:.1} GiB",
            b as f64 / (1u64 << 30) as f64
        )),
    );
    if let Some(path) = args.json {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        writeln!(file, "{result}")?;
    }
    Ok(())
}

/// Header of the table rows printed by `bench`.
pub const TABLE_HEADER: &str = "| size | device | dtype | batch x seq | frames | s/step | tokens/s | est. TFLOP/s | reserved |\n|---|---|---|---|---|---|---|---|---|";
