//! The default job: build a VLM, run forward and backward on a generated video batch,
//! take a few AdamW steps on that batch, and print what happened.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use longview_models::VlmConfig;

use crate::DeviceArgs;
use crate::synthetic;

#[derive(Args, Debug)]
pub struct DemoArgs {
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Model size: debug, small, 1.5b or 7b.
    #[arg(long, default_value = "debug")]
    pub size: String,
    /// Videos in the batch.
    #[arg(long, default_value_t = 2)]
    pub batch: usize,
    /// Frames per video.
    #[arg(long, default_value_t = 8)]
    pub frames: usize,
    /// AdamW steps after the first forward/backward.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f64,
}

pub fn named_config(size: &str) -> Result<VlmConfig> {
    VlmConfig::named(size)
        .with_context(|| format!("--size `{size}`: expected debug, small, 1.5b or 7b"))
}

fn millions(n: usize) -> String {
    format!("{:.2}M", n as f64 / 1e6)
}

pub fn run(args: DemoArgs) -> Result<()> {
    let config = named_config(&args.size)?;
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let device = args.device.device()?;
    let mut model = config.init(&device);
    // Weights, gradients and two AdamW moments.
    crate::check_cpu_memory(&args.device, model.num_params(), 4)?;
    let (v, t) = (&config.vision, &config.text);
    println!(
        "longview demo: {} VLM on {} ({})",
        args.size, args.device.device, args.device.dtype
    );
    println!(
        "  vision    SigLIP  {} layers x {} wide, {} heads, {}px / {}px patches -> {} patches a frame ({} params)",
        v.num_layers,
        v.hidden_size,
        v.num_heads,
        v.image_size,
        v.patch_size,
        v.grid_side() * v.grid_side(),
        millions(model.vision_tower.num_params())
    );
    println!(
        "  projector {:?} -> {} tokens a frame ({} params)",
        config.projector.kind,
        config.tokens_per_frame(),
        millions(model.mm_projector.num_params())
    );
    println!(
        "  llm       Qwen2   {} layers x {} wide, {} q / {} kv heads, vocab {}, rope base {} ({} params)",
        t.num_layers,
        t.hidden_size,
        t.num_heads,
        t.num_kv_heads,
        t.vocab_size,
        t.rope_theta,
        millions(model.llm.num_params())
    );

    let batch = synthetic::batch(
        &config,
        args.batch,
        args.frames,
        12,
        8,
        args.device.seed(),
        &device,
    )?;
    println!(
        "  batch     {} videos x {} frames = {} frames, {} tokens a row ({} visual), {} supervised answer tokens",
        args.batch,
        args.frames,
        batch.frames,
        batch.seq_len,
        batch.visual_tokens / args.batch.max(1),
        batch.supervised_tokens
    );

    let start = Instant::now();
    let loss = model.loss(batch.input.clone(), batch.labels.clone())?;
    let first_loss: f32 = loss.clone().into_scalar();
    let grads = loss.backward();
    device.sync().ok();
    let first_step = start.elapsed();
    let grads = GradientsParams::from_grads(grads, &model);
    let with_grad = grads.len();
    println!(
        "  step 0    forward+backward {:.2}s, loss {:.4} (ln vocab = {:.4}), gradients for {} parameter tensors",
        first_step.as_secs_f64(),
        first_loss,
        (t.vocab_size as f64).ln(),
        with_grad
    );
    if !first_loss.is_finite() {
        bail!("the initial loss is {first_loss}: the model produced non-finite values");
    }

    let mut optimizer = AdamWConfig::new().with_weight_decay(0.0).init();
    model = optimizer.step(args.lr, model, grads);
    let bar = ProgressBar::new(args.steps as u64);
    bar.set_style(
        ProgressStyle::with_template("  training  [{bar:30}] {pos}/{len} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let mut last_loss = first_loss;
    let timer = Instant::now();
    for _ in 0..args.steps {
        let loss = model.loss(batch.input.clone(), batch.labels.clone())?;
        last_loss = loss.clone().into_scalar();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optimizer.step(args.lr, model, grads);
        let tokens = (bar.position() + 1) as f64 * (args.batch * batch.seq_len) as f64;
        bar.set_message(format!(
            "loss {last_loss:.4}, {:.0} tokens/s",
            tokens / timer.elapsed().as_secs_f64()
        ));
        bar.inc(1);
    }
    bar.finish();
    let elapsed = timer.elapsed().as_secs_f64();

    println!("summary");
    println!(
        "  loss      {first_loss:.4} -> {last_loss:.4} after {} AdamW steps on one batch (lr {})",
        args.steps + 1,
        args.lr
    );
    if args.steps > 0 {
        println!(
            "  speed     {:.2}s a step, {:.0} tokens/s (forward+backward+update, {} tokens a step)",
            elapsed / args.steps as f64,
            (args.steps * args.batch * batch.seq_len) as f64 / elapsed,
            args.batch * batch.seq_len
        );
    }
    if args.steps >= 5 && last_loss >= first_loss {
        bail!("the loss did not fall ({first_loss:.4} -> {last_loss:.4}): training is broken");
    }
    println!(
        "  note      the demo feeds random tensors to one batch; `cargo xtask train` runs the real pipeline (videos, tokenizer, checkpoints)"
    );
    Ok(())
}
