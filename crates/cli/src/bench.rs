//! Forward+backward throughput of a named model size on generated inputs.
//!
//! Reports LLM tokens/s and an estimated model FLOP rate: linear layers count
//! 6 x params x tokens (forward 2, backward 4), attention 4 x seq^2 x width per layer
//! forward (halved for causal LLM attention) and twice that backward. The timer stops
//! after `Device::sync`, and warm-up iterations (JIT compilation, autotuning) are not
//! timed. The loss runs the LM head on the supervised rows only, and the estimate
//! counts it there only; recomputed forwards are not counted (model FLOPs).

use std::time::Instant;

use anyhow::Result;
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{DType, Tensor};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::demo::named_config;
use crate::{DeviceArgs, synthetic};
use longview_models::attention::{AttentionImpl, flash_available};
use longview_train::remat::{Recompute, loss_and_grads};

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
    /// Activation recomputation: `none` (autodiff keeps everything), `layers`
    /// (per-layer recompute) or `attention-aware` (LightSeq: the attention forward is
    /// never recomputed).
    #[arg(long, default_value = "none")]
    pub recompute: Recompute,
    /// Before timing, check the loss and every parameter gradient of one step against
    /// the same step without recomputation (`--recompute none`), and fail past
    /// `--check` (largest |difference| / largest |reference| per parameter).
    #[arg(long)]
    pub check: Option<f32>,
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
        args.device.seed(),
        &device,
    )?;
    let tokens = args.batch * batch.seq_len;

    let supervised = (args.batch * answer) as f32;
    if let Some(tolerance) = args.check {
        let run = |mode| {
            loss_and_grads(
                &model,
                batch.input.clone(),
                batch.labels.clone(),
                supervised,
                mode,
            )
        };
        let (want_loss, want) = run(Recompute::None)?;
        let (got_loss, got) = run(args.recompute)?;
        // The same step twice without recomputation: the run-to-run noise (atomics in
        // the flash backward, autotuned kernels) that bounds any comparison.
        let (again_loss, again) = run(Recompute::None)?;
        let (noise, _) = worst_relative_difference(&model, &again, &want)?;
        let (worst, compared) = worst_relative_difference(&model, &got, &want)?;
        println!(
            "check --recompute {} vs none: loss {got_loss} vs {want_loss} (none again: \
             {again_loss}); {compared} parameter gradients, worst relative difference {worst:.2e} \
             (none vs none: {noise:.2e}; tolerance {tolerance:.1e})",
            args.recompute
        );
        let loss_error = (got_loss - want_loss).abs() / want_loss.abs().max(1e-6);
        if !(worst <= tolerance && loss_error <= tolerance) {
            anyhow::bail!(
                "--check failed: gradients differ by {worst:.2e}, loss by {loss_error:.2e} \
                 (tolerance {tolerance:.1e})"
            );
        }
    }
    let step = || -> Result<()> {
        let (_loss, _grads) = loss_and_grads(
            &model,
            batch.input.clone(),
            batch.labels.clone(),
            supervised,
            args.recompute,
        )?;
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
    ) - head_flops_skipped(&config, tokens, args.batch * answer);
    let memory = device.memory_pool_usage().map(|m| m.bytes_reserved);
    // MFU against what the linear layers' matmul (cuBLASLt on CUDA bf16/f16) reaches
    // on this device, measured now, and against the datasheet peak.
    let ceiling = if args.device.device == "cpu" {
        None
    } else {
        Some(crate::matmul_ceiling(&device)?)
    };
    let tflops = flops / seconds / 1e12;

    let result = json!({
        "size": args.size, "device": args.device.device, "dtype": args.device.dtype,
        "attention": args.attention, "recompute": args.recompute.to_string(),
        "batch": args.batch, "frames": batch.frames, "seq_len": batch.seq_len,
        "llm_tokens": tokens, "seconds_per_step": seconds,
        "tokens_per_second": tokens as f64 / seconds,
        "tflops": tflops,
        "matmul_ceiling_tflops": ceiling,
        "matmul_ceiling_impl": crate::device::matmul_ceiling_impl(&device),
        "mfu_vs_ceiling": ceiling.map(|c| tflops / c),
        "mfu_vs_datasheet_peak": ceiling.map(|_| tflops / crate::device::DATASHEET_PEAK_TFLOPS),
        "reserved_bytes": memory,
    });
    println!("{TABLE_HEADER}");
    println!(
        "| {} | {} | {} | {} | {} | {}x{} | {} | {:.3} | {:.0} | {:.2} | {} |",
        args.size,
        args.attention,
        args.recompute,
        args.device.device,
        args.device.dtype,
        args.batch,
        batch.seq_len,
        batch.frames,
        seconds,
        tokens as f64 / seconds,
        tflops,
        memory.map_or("n/a".to_string(), |b| format!(
            "{:.1} GiB",
            b as f64 / (1u64 << 30) as f64
        )),
    );
    if let Some(ceiling) = ceiling {
        println!(
            "matmul ceiling (8192^3, {}, this device): {ceiling:.1} TFLOP/s; MFU vs it: {:.1}%; \
             vs the {:.0} TFLOP/s datasheet peak: {:.1}%",
            crate::device::matmul_ceiling_impl(&device),
            100.0 * tflops / ceiling,
            crate::device::DATASHEET_PEAK_TFLOPS,
            100.0 * tflops / crate::device::DATASHEET_PEAK_TFLOPS
        );
    }
    if let Some(path) = args.json {
        crate::device::append_json_lines(&path, &[result])?;
    }
    Ok(())
}

/// The largest per-parameter `max|got - want| / max(max|want|, 1e-3 x the model's
/// largest |want|)` and how many parameters had a gradient; errors when one side has
/// a gradient the other lacks. The floor covers gradients that are zero in exact
/// arithmetic (key biases: softmax ignores a constant shift), which hold rounding
/// noise only.
fn worst_relative_difference(
    model: &longview_models::Vlm,
    got: &GradientsParams,
    want: &GradientsParams,
) -> Result<(f32, usize)> {
    struct Compare<'a> {
        got: &'a GradientsParams,
        want: &'a GradientsParams,
        /// (largest |difference|, largest |want|) per parameter.
        pairs: Vec<(f32, f32)>,
        missing: usize,
    }
    impl ModuleVisitor for Compare<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            match (self.got.get::<D>(param.id), self.want.get::<D>(param.id)) {
                (Some(got), Some(want)) => {
                    let (got, want) = (got.cast(DType::F32), want.cast(DType::F32));
                    let scale = want.clone().abs().max().into_scalar::<f32>();
                    let diff = (got - want).abs().max().into_scalar::<f32>();
                    self.pairs.push((diff, scale));
                }
                (None, None) => {}
                _ => self.missing += 1,
            }
        }
    }
    let mut compare = Compare {
        got,
        want,
        pairs: Vec::new(),
        missing: 0,
    };
    model.visit(&mut compare);
    if compare.missing > 0 {
        anyhow::bail!(
            "--check: {} parameters have a gradient on one side only",
            compare.missing
        );
    }
    let global = compare.pairs.iter().fold(0f32, |m, p| m.max(p.1));
    let worst = compare.pairs.iter().fold(0f32, |m, &(diff, scale)| {
        m.max(diff / scale.max(1e-3 * global).max(f32::MIN_POSITIVE))
    });
    Ok((worst, compare.pairs.len()))
}

/// `train_flops` counts the LM head on every token; the step computes it on the
/// supervised rows only (`Qwen2::next_token_loss_sum`), so those FLOPs are not done.
fn head_flops_skipped(
    config: &longview_models::VlmConfig,
    tokens: usize,
    supervised: usize,
) -> f64 {
    let head = (config.text.vocab_size * config.text.hidden_size) as f64;
    6.0 * head * tokens.saturating_sub(supervised) as f64
}

/// Header of the table rows printed by `bench`.
pub const TABLE_HEADER: &str = "| size | attention | recompute | device | dtype | batch x seq | frames | s/step | tokens/s | est. TFLOP/s | reserved |\n|---|---|---|---|---|---|---|---|---|---|---|";
