//! The training loop: micro-batches summed into one step with the loss normalised by
//! the step's supervised-token count, global-norm clipping, AdamW under a warmup +
//! cosine schedule, JSONL metrics, a progress bar, and atomic checkpoints that
//! `resume` continues bit for bit.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamGroup};
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams, ModuleOptimizer};
use burn::tensor::{DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use longview_data::TextTokenizer;
use longview_models::attention::{AttentionImpl, flash_available};
use longview_models::hf::checkpoint::load_vila;
use longview_models::vila::causal_lm_loss_sum;
use longview_models::vila::{Qwen2, train_flops};
use longview_models::{Vlm, VlmConfig};
use serde::Serialize;

use crate::checkpoint::{self, FORMAT_VERSION, TrainerState};
use crate::config::{AttentionChoice, DataKind, OptimConfig, Part, TrainConfig};
use crate::data::{Encoder, HaystackData, RowSet, Sample, TextSet, TrainData, collate, haystack};
use crate::error::TrainError;
use crate::needle::{self, NeedleReport};
use crate::remat::{Recompute, loss_and_grads};

/// How a run is started.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Continue from the newest checkpoint in `run.out` (error if there is none).
    pub resume: bool,
    /// Stop after this many steps of this invocation (the schedule still spans
    /// `run.steps`); used to test interruption and resume.
    pub stop_after: Option<usize>,
    /// Draw a progress bar on stderr.
    pub progress: bool,
    /// The device's dense matmul rate in TFLOP/s (measured by the caller on a GPU):
    /// with it, every step reports its model FLOPs utilisation (MFU).
    pub matmul_tflops: Option<f64>,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            resume: false,
            stop_after: None,
            progress: true,
            matmul_tflops: None,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// Mean loss of every step since the run began (resumed steps included).
    pub losses: Vec<f32>,
    pub first_step: usize,
    pub last_step: usize,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
    pub checkpoint: Option<PathBuf>,
    /// Held-out needle accuracy after the last step (when the data has a held-out set).
    pub eval: Option<NeedleReport>,
    /// What the training samples were drawn from.
    pub data: String,
    /// Model TFLOP/s over this invocation's steps (wall time, data loading included).
    pub model_tflops: f64,
    pub params: usize,
    pub trainable_params: usize,
    /// The most device memory the allocator held after a step (MiB), where the
    /// backend reports it.
    pub peak_device_mib: Option<f64>,
    /// The attention the model ran with.
    pub attention: AttentionImpl,
}

/// The attention implementation `choice` means on `device`.
pub fn resolve_attention(
    choice: AttentionChoice,
    device: &Device,
) -> Result<AttentionImpl, TrainError> {
    match choice {
        AttentionChoice::Reference => Ok(AttentionImpl::Reference),
        AttentionChoice::Auto if flash_available(device) => Ok(AttentionImpl::Flash),
        AttentionChoice::Auto => Ok(AttentionImpl::Reference),
        AttentionChoice::Flash if flash_available(device) => Ok(AttentionImpl::Flash),
        AttentionChoice::Flash => Err(TrainError::Config {
            source_name: "run.attention".into(),
            message: format!(
                "`flash` needs a CUDA device and a build with the `cuda` feature (this run is \
                 on {device:?}); use `auto` or `reference`"
            ),
        }),
    }
}

/// The memory the device's allocator holds (MiB), where the backend reports it.
fn device_mib(device: &Device) -> Option<f64> {
    device
        .memory_pool_usage()
        .map(|usage| usage.bytes_reserved as f64 / (1u64 << 20) as f64)
}

/// Learning rate of step `step` (0-based): linear warmup to `lr`, then cosine decay to
/// `lr * min_lr_ratio` at the last step.
pub fn learning_rate(optim: &OptimConfig, step: usize, total: usize) -> f64 {
    if step < optim.warmup_steps {
        return optim.lr * (step + 1) as f64 / optim.warmup_steps as f64;
    }
    let span = total.saturating_sub(optim.warmup_steps + 1).max(1);
    let progress = ((step - optim.warmup_steps) as f64 / span as f64).min(1.0);
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    optim.lr * (optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * cosine)
}

/// The tokenizer of a run: the `init_from` checkpoint's, else the embedded debug one.
pub fn tokenizer(config: &TrainConfig) -> Result<TextTokenizer, TrainError> {
    match &config.model.init_from {
        Some(dir) => Ok(TextTokenizer::from_checkpoint_dir(dir)?),
        None => Ok(TextTokenizer::debug()),
    }
}

/// The model shape of a randomly initialised run: the named size, with the visual
/// placeholder set to the tokenizer's `<image>` id (and, for `debug`, the vocabulary
/// sized to the tokenizer).
pub fn model_config(
    config: &TrainConfig,
    tokenizer: &TextTokenizer,
) -> Result<VlmConfig, TrainError> {
    let mut vlm = VlmConfig::named(&config.model.size).ok_or_else(|| TrainError::Config {
        source_name: "model".into(),
        message: format!(
            "`model.size`: `{}` is not debug, small, 1.5b or 7b",
            config.model.size
        ),
    })?;
    if matches!(config.model.size.as_str(), "debug" | "small") {
        vlm.text.vocab_size = tokenizer.vocab_size();
    }
    vlm.placeholder_token_id = tokenizer.require("<image>")?;
    if vlm.placeholder_token_id as usize >= vlm.text.vocab_size {
        return Err(TrainError::Config {
            source_name: "model".into(),
            message: format!(
                "the tokenizer's <image> id {} is outside the model's vocabulary of {}",
                vlm.placeholder_token_id, vlm.text.vocab_size
            ),
        });
    }
    Ok(vlm)
}

/// Starts a worker that builds the samples of `steps` steps (`per_step` each, from
/// stream position `first`) in order, two steps ahead of the consumer. The worker
/// stops when the receiver is dropped; an error is sent in place of its step.
fn prefetch(
    train: TrainData,
    encoder: &Encoder<'_>,
    seed: u64,
    first: usize,
    per_step: usize,
    steps: usize,
) -> std::sync::mpsc::Receiver<Result<Vec<Sample>, TrainError>> {
    let (tx, rx) = std::sync::mpsc::sync_channel(2);
    let tokenizer = encoder.tokenizer.clone();
    let (template, model) = (encoder.template.clone(), encoder.model.clone());
    let (width, height) = (encoder.width, encoder.height);
    std::thread::spawn(move || {
        let encoder = Encoder {
            tokenizer: &tokenizer,
            template,
            model: &model,
            width,
            height,
        };
        for step in 0..steps {
            let start = first + step * per_step;
            let samples = (0..per_step)
                .map(|i| train.sample(&encoder, seed, start + i))
                .collect::<Result<Vec<Sample>, _>>();
            let failed = samples.is_err();
            if tx.send(samples).is_err() || failed {
                break;
            }
        }
    });
    rx
}

/// Only the LoRA adapters, the embeddings and the norms of `llm` train.
fn lora_trainable(llm: Qwen2) -> Qwen2 {
    let mut llm = llm.no_grad();
    let m = &mut llm.model;
    m.embed_tokens = m.embed_tokens.clone().set_require_grad(true);
    m.norm = m.norm.clone().set_require_grad(true);
    for layer in &mut m.layers {
        layer.input_layernorm = layer.input_layernorm.clone().set_require_grad(true);
        layer.post_attention_layernorm = layer
            .post_attention_layernorm
            .clone()
            .set_require_grad(true);
        layer.self_attn.lora = layer
            .self_attn
            .lora
            .take()
            .map(|lora| lora.set_require_grad(true));
    }
    llm
}

fn freeze(model: Vlm, trainable: &[Part]) -> Vlm {
    let Vlm {
        mut vision_tower,
        mut mm_projector,
        mut llm,
        vision_feature,
        placeholder_token_id,
    } = model;
    if !trainable.contains(&Part::Vision) {
        vision_tower = vision_tower.no_grad();
    }
    if !trainable.contains(&Part::Projector) {
        mm_projector = mm_projector.no_grad();
    }
    if trainable.contains(&Part::LlmLora) {
        llm = lora_trainable(llm);
    } else if !trainable.contains(&Part::Llm) {
        llm = llm.no_grad();
    }
    Vlm {
        vision_tower,
        mm_projector,
        llm,
        vision_feature,
        placeholder_token_id,
    }
}

/// `data.path`, which must be a file for the JSONL kinds.
fn data_path(config: &TrainConfig) -> Result<&Path, TrainError> {
    let path = config
        .data
        .path
        .as_deref()
        .expect("validate() requires data.path for JSONL kinds");
    if !path.is_file() {
        return Err(TrainError::Config {
            source_name: "data.path".into(),
            message: format!(
                "{} is not a file (the JSONL rows of data.kind `{}`)",
                path.display(),
                serde_json::to_value(config.data.kind)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default()
            ),
        });
    }
    Ok(path)
}

/// Parameters that AdamW does not decay: biases and normalisation scales/shifts
/// (every one-dimensional parameter of the models), matched by module path.
pub const NO_DECAY: &str = r"\.(bias|gamma|beta)$";

/// AdamW with `optim.weight_decay` on weight matrices, embeddings and convolution
/// kernels, and no decay on [`NO_DECAY`] parameters (the usual split of
/// transformers' Trainer and Megatron).
pub fn optimizer(optim: &OptimConfig) -> ModuleOptimizer {
    let adamw = |decay: f64| {
        AdamWConfig::new()
            .with_beta_1(optim.beta1 as f32)
            .with_beta_2(optim.beta2 as f32)
            .with_epsilon(optim.eps as f32)
            .with_weight_decay(decay as f32)
    };
    let no_decay = ParamGroup::from_regex(NO_DECAY).expect("NO_DECAY is a valid regex");
    adamw(optim.weight_decay)
        .init()
        .with_group(no_decay, adamw(0.0).build(), None)
}

/// Global L2 norm of all gradients (one device sync).
pub fn global_grad_norm<M: Module>(model: &M, grads: &GradientsParams) -> f32 {
    struct Norm<'a> {
        grads: &'a GradientsParams,
        sum: Option<Tensor<1>>,
    }
    impl ModuleVisitor for Norm<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                let s = (g.clone() * g).sum();
                self.sum = Some(match self.sum.take() {
                    Some(acc) => acc + s,
                    None => s,
                });
            }
        }
    }
    let mut norm = Norm { grads, sum: None };
    model.visit(&mut norm);
    norm.sum.map_or(0.0, |s| s.into_scalar::<f32>().sqrt())
}

/// Multiplies every gradient by `factor`.
pub fn scale_grads<M: Module>(model: &M, grads: &mut GradientsParams, factor: f32) {
    struct Scale<'a> {
        grads: &'a mut GradientsParams,
        factor: f32,
    }
    impl ModuleVisitor for Scale<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.remove::<D>(param.id) {
                self.grads
                    .register::<D>(param.id, g.mul_scalar(self.factor));
            }
        }
    }
    model.visit(&mut Scale { grads, factor });
}

/// `module` with every float parameter cast to `dtype`, ids and gradient
/// requirements kept (mixed precision: the f32 master copy and its bf16/f16 working
/// copy share parameter ids, so the working copy's gradients name the master's
/// parameters).
pub fn cast_params<M: Module>(module: M, dtype: DType) -> M {
    struct Cast(DType);
    impl ModuleMapper for Cast {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let (id, value, mapper) = param.consume();
            if value.dtype() == self.0 {
                return Param::from_mapped_value(id, value, mapper);
            }
            let require_grad = value.is_require_grad();
            let value = value.cast(self.0).detach().set_require_grad(require_grad);
            Param::from_mapped_value(id, value, mapper)
        }
    }
    module.map(&mut Cast(dtype))
}

/// Casts every gradient of `model`'s parameters in `grads` to `dtype`.
pub fn cast_grads<M: Module>(model: &M, grads: &mut GradientsParams, dtype: DType) {
    struct Cast<'a> {
        grads: &'a mut GradientsParams,
        dtype: DType,
    }
    impl ModuleVisitor for Cast<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.remove::<D>(param.id) {
                self.grads.register::<D>(param.id, g.cast(self.dtype));
            }
        }
    }
    model.visit(&mut Cast { grads, dtype });
}

fn count_params(model: &Vlm) -> (usize, usize) {
    struct Count {
        all: usize,
        trainable: usize,
    }
    impl ModuleVisitor for Count {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let n = param.lazy_shape().num_elements();
            self.all += n;
            if param.is_require_grad() {
                self.trainable += n;
            }
        }
    }
    let mut count = Count {
        all: 0,
        trainable: 0,
    };
    model.visit(&mut count);
    (count.all, count.trainable)
}

/// One line of `metrics.jsonl`.
#[derive(Serialize)]
struct Metrics {
    step: usize,
    loss: f32,
    lr: f64,
    grad_norm: f32,
    tokens: usize,
    /// Tokens per second since the run (this invocation) began, start-up included.
    tokens_per_s: f64,
    /// Wall time of this step's forward, backward and optimizer update (data
    /// loading overlaps it on the worker thread).
    step_s: f64,
    elapsed_s: f64,
    rss_mib: Option<f64>,
    /// Memory held by the device's allocator after the step, MiB (GPU runs).
    #[serde(skip_serializing_if = "Option::is_none")]
    device_mib: Option<f64>,
    /// Model TFLOP/s of the step ([`longview_models::vila::train_flops`]).
    model_tflops: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    mfu: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    needle_accuracy: Option<f64>,
}

/// Resident memory of this process (Linux), MiB.
fn rss_mib() -> Option<f64> {
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
fn truncate_metrics(path: &Path, done: usize) -> Result<(), TrainError> {
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

/// Computes one optimizer step: the global mean loss and this rank's gradients of it
/// (complete, i.e. already summed over ranks where the work is split).
pub trait StepRunner {
    /// `micro`: the step's micro-batches (the global batch, the same on every rank);
    /// `supervised`: the step's global supervised-token count.
    fn step(
        &self,
        model: &Vlm,
        micro: &[Vec<&Sample>],
        supervised: usize,
        device: &Device,
    ) -> Result<(f32, GradientsParams), TrainError>;

    /// Whether this rank writes checkpoints, metrics, event files and the progress bar.
    fn writes(&self) -> bool {
        true
    }

    /// Makes every rank start from the same weights.
    fn sync_model(&self, model: Vlm) -> Result<Vlm, TrainError> {
        Ok(model)
    }

    /// Waits until every rank has called it (the writer prepares shared files first).
    fn barrier(&self) -> Result<(), TrainError> {
        Ok(())
    }
}

/// Everything on one device: micro-batches summed, each normalised by the step's
/// supervised-token count; with `recompute`, through [`crate::remat`].
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleDevice {
    pub recompute: Recompute,
}

impl StepRunner for SingleDevice {
    fn step(
        &self,
        model: &Vlm,
        micro: &[Vec<&Sample>],
        supervised: usize,
        device: &Device,
    ) -> Result<(f32, GradientsParams), TrainError> {
        let mut accumulator = GradientsAccumulator::<Vlm>::new();
        let mut loss_value = 0.0f32;
        for samples in micro {
            let batch = collate(samples, device);
            if self.recompute != Recompute::None {
                let (loss, grads) = loss_and_grads(
                    model,
                    batch.input,
                    batch.labels,
                    supervised.max(1) as f32,
                    self.recompute,
                )?;
                loss_value += loss;
                accumulator.accumulate(model, grads);
                continue;
            }
            let logits = model.forward(batch.input)?;
            let (sum, _) = causal_lm_loss_sum(logits, batch.labels);
            let loss = sum.div_scalar(supervised.max(1) as f32);
            loss_value += loss.clone().into_scalar::<f32>();
            let grads = GradientsParams::from_grads(loss.backward(), model);
            accumulator.accumulate(model, grads);
        }
        Ok((loss_value, accumulator.grads()))
    }
}

/// Runs (or resumes) a training run on one device; `log` receives human-readable lines.
pub fn train(
    config: &TrainConfig,
    options: &TrainOptions,
    device: &Device,
    log: &mut dyn FnMut(&str),
) -> Result<TrainSummary, TrainError> {
    let runner = SingleDevice {
        recompute: config.run.recompute,
    };
    train_with(config, options, device, log, &runner)
}

/// Runs (or resumes) a training run with `runner` computing the steps (one device, or
/// this rank's part of a parallel layout).
pub fn train_with(
    config: &TrainConfig,
    options: &TrainOptions,
    device: &Device,
    log: &mut dyn FnMut(&str),
    runner: &dyn StepRunner,
) -> Result<TrainSummary, TrainError> {
    config.validate("(in memory)")?;
    let writes = runner.writes();
    let out = &config.run.out;
    std::fs::create_dir_all(out).map_err(TrainError::io(out))?;
    if writes {
        for name in checkpoint::clean_partial(out)? {
            log(&format!(
                "removed the unfinished checkpoint {name} of an interrupted run"
            ));
        }
    }
    let latest = checkpoint::latest(out)?;
    let compute: DType = device.settings().float_dtype.into();
    let master = matches!(compute, DType::BF16 | DType::F16);
    if master && options.resume && latest.is_some() {
        // Burn 0.22 reloads AdamW's moments in the device's default float dtype, which
        // then meet the f32 master's gradients (a dtype panic inside Burn).
        return Err(TrainError::Request(format!(
            "resuming a {compute:?} run (f32 master weights) is not supported yet: Burn 0.22 \
             reloads the optimizer state in {compute:?}; resume with --dtype f32 (the \
             checkpoint holds f32 weights and optimizer state) or start a fresh run"
        )));
    }
    match (&latest, options.resume) {
        (Some(dir), false) => {
            return Err(TrainError::Checkpoint {
                path: dir.clone(),
                message: "the run folder already has checkpoints: pass --resume to continue it, \
                          or choose another run.out / --out"
                    .into(),
            });
        }
        (None, true) => {
            return Err(TrainError::Checkpoint {
                path: checkpoint::root(out),
                message: "--resume given but there is no complete checkpoint to resume from".into(),
            });
        }
        _ => {}
    }

    let tokenizer = tokenizer(config)?;
    let tokenizer_json = tokenizer
        .inner()
        .to_string(false)
        .map_err(|e| TrainError::Config {
            source_name: tokenizer.source().into(),
            message: format!("cannot serialise the tokenizer: {e}"),
        })?;
    let trainable = config.trainable();
    let (model, vlm_config, mut optim, mut state) = match &latest {
        Some(dir) => {
            let loaded = checkpoint::load(dir, optimizer(&config.optim), device)?;
            if loaded.state.seed != config.run.seed {
                return Err(TrainError::checkpoint(
                    dir,
                    format!(
                        "was written with run.seed {} but the config says {}: the data order would differ",
                        loaded.state.seed, config.run.seed
                    ),
                ));
            }
            log(&format!(
                "resuming from {} (step {})",
                dir.display(),
                loaded.state.step
            ));
            (loaded.model, loaded.config, loaded.optimizer, loaded.state)
        }
        None => {
            let (mut model, mut vlm_config) = match &config.model.init_from {
                Some(dir) => load_vila(dir, device)?,
                None => {
                    let vlm_config = model_config(config, &tokenizer)?;
                    device.seed(config.run.seed);
                    // In a parallel run the ranks' draws interleave on a shared RNG;
                    // sync_model below gives every rank the writer's weights.
                    (vlm_config.init(device), vlm_config)
                }
            };
            if let Some(theta) = config.model.rope_theta {
                log(&format!(
                    "RoPE base {} -> {theta}",
                    vlm_config.text.rope_theta
                ));
                vlm_config.text.rope_theta = theta;
                model.llm.rope_theta = theta;
            }
            if trainable.contains(&Part::LlmLora) {
                model.llm = model.llm.with_lora(
                    config.model.lora_rank,
                    config.model.lora_alpha,
                    config.run.seed,
                    device,
                );
            }
            let state = TrainerState {
                format_version: FORMAT_VERSION,
                step: 0,
                samples_seen: 0,
                tokens_seen: 0,
                seed: config.run.seed,
                losses: Vec::new(),
                elapsed_s: 0.0,
                config: config.to_toml(),
            };
            (model, vlm_config, optimizer(&config.optim), state)
        }
    };
    let attention = resolve_attention(config.run.attention, device)?;
    if attention != AttentionImpl::Reference {
        log(&format!(
            "attention: {attention:?} (vision encoder and LLM)"
        ));
    }
    let model = model.with_attention(attention, attention);
    let mut model = freeze(runner.sync_model(model)?, &trainable);
    // 16-bit compute keeps f32 master weights: the optimizer updates (and checkpoints
    // save) the f32 copy; every step runs on a bf16/f16 copy with the same ids.
    if master {
        model = cast_params(model, DType::F32);
        log(&format!(
            "precision: {compute:?} compute, f32 master weights and optimizer state"
        ));
    }
    // What evaluation runs on: the model in the compute dtype (inputs come in it).
    let compute_copy = |model: &Vlm| {
        if master {
            cast_params(model.clone(), compute)
        } else {
            model.clone()
        }
    };
    let (params, trainable_params) = count_params(&model);
    if writes {
        std::fs::write(out.join("config.toml"), config.to_toml())
            .map_err(TrainError::io(out.join("config.toml")))?;
    }

    // The writer generates (or checks) the shared video cache before the others read it.
    if !writes {
        runner.barrier()?;
    }
    let side = vlm_config.vision.image_size as u32;
    let encoder = Encoder {
        tokenizer: &tokenizer,
        template: longview_data::ChatTemplate::qwen2(),
        model: &vlm_config,
        width: config.data.width.unwrap_or(side),
        height: config.data.height.unwrap_or(side),
    };
    let (train, eval) = match config.data.kind {
        DataKind::Text => {
            let path = data_path(config)?;
            let text = TextSet::read(
                path,
                &tokenizer,
                config.data.max_tokens,
                vlm_config.vision.image_size,
            )?;
            log(&format!("data: {}", text.summary));
            (TrainData::Text(text), Vec::new())
        }
        DataKind::Conversations | DataKind::Cot => {
            let path = data_path(config)?;
            let rows = RowSet::read(config.data.kind, path, config.data.frames)?;
            log(&format!(
                "data: {}; {} frames a video",
                rows.summary, config.data.frames
            ));
            (TrainData::Rows(rows), Vec::new())
        }
        DataKind::Haystack => {
            let cache = config
                .data
                .cache
                .clone()
                .unwrap_or_else(|| out.join("data"));
            log(&format!(
                "data: needles ({} frames per number) inserted into haystacks of {:?} frames \
                 for training, {} videos per depth held out ({})",
                config.data.needle_copies,
                crate::data::train_lengths(config.data.min_frames, config.data.frames),
                config.data.eval_per_depth,
                cache.display()
            ));
            let HaystackData { train, eval } = haystack(
                &encoder,
                &cache,
                config.data.frames,
                config.data.min_frames,
                config.data.needle_copies,
                config.data.eval_per_depth,
                config.run.seed,
            )?;
            (TrainData::Needles(train), eval)
        }
    };
    if writes {
        runner.barrier()?;
    }

    let metrics_path = out.join("metrics.jsonl");
    let mut sinks = if writes {
        truncate_metrics(&metrics_path, state.step)?;
        let events = crate::tensorboard::EventWriter::create(&out.join("tensorboard"))?;
        let metrics = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics_path)
            .map_err(TrainError::io(&metrics_path))?;
        Some((metrics, events))
    } else {
        None
    };

    let total = config.run.steps;
    let first_step = state.step;
    let last = options
        .stop_after
        .map_or(total, |n| (first_step + n).min(total));
    let bar = if options.progress && writes {
        ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] step {pos}/{len} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_position(first_step as u64);
    let timer = Instant::now();
    let elapsed_before = state.elapsed_s;
    let mut tokens_this_run = 0u64;
    let mut flops_this_run = 0f64;
    let mut last_checkpoint = None;
    let mut peak_device_mib: Option<f64> = None;
    let per_step = config.run.batch_size * config.run.grad_accum;

    // The next steps' samples are decoded on a worker thread while this one computes.
    let data_description = train.describe();
    let prefetch = prefetch(
        train,
        &encoder,
        config.run.seed,
        state.samples_seen,
        per_step,
        last - first_step,
    );
    for step in first_step..last {
        // The step's micro-batches, and its supervised-token count for normalisation.
        let samples = prefetch
            .recv()
            .map_err(|_| TrainError::Request("the data worker stopped".into()))??;
        let micro: Vec<Vec<&Sample>> = samples
            .chunks(config.run.batch_size)
            .map(|chunk| chunk.iter().collect())
            .collect();
        let step_timer = Instant::now();
        let seq_lens: Vec<usize> = samples.iter().map(|s| s.ids.len()).collect();
        let frames: usize = samples.iter().map(|s| s.frames).sum();
        let step_flops = train_flops(&model, &vlm_config, &seq_lens, frames);
        let supervised: usize = micro.iter().flatten().map(|s| s.supervised()).sum();
        let step_tokens: usize = micro.iter().flatten().map(|s| s.ids.len()).sum();
        let (loss_value, mut grads) = if master {
            let working = compute_copy(&model);
            let (loss, mut grads) = runner.step(&working, &micro, supervised, device)?;
            cast_grads(&model, &mut grads, DType::F32);
            (loss, grads)
        } else {
            runner.step(&model, &micro, supervised, device)?
        };
        if !loss_value.is_finite() {
            bar.abandon();
            return Err(TrainError::Diverged {
                step: step + 1,
                loss: loss_value,
            });
        }
        let grad_norm = global_grad_norm(&model, &grads);
        if config.optim.clip_grad_norm > 0.0 && grad_norm > config.optim.clip_grad_norm as f32 {
            scale_grads(
                &model,
                &mut grads,
                config.optim.clip_grad_norm as f32 / grad_norm,
            );
        }
        let lr = learning_rate(&config.optim, step, total);
        model = optim.step(lr, model, grads);

        state.step = step + 1;
        state.samples_seen += per_step;
        state.tokens_seen += step_tokens as u64;
        state.losses.push(loss_value);
        tokens_this_run += step_tokens as u64;
        let run_s = timer.elapsed().as_secs_f64();
        state.elapsed_s = elapsed_before + run_s;
        let tokens_per_s = tokens_this_run as f64 / run_s.max(1e-9);
        let step_s = step_timer.elapsed().as_secs_f64();
        let model_tflops = step_flops / step_s.max(1e-9) / 1e12;
        let mfu = options.matmul_tflops.map(|peak| model_tflops / peak);
        flops_this_run += step_flops;

        let needle_accuracy = if writes
            && config.run.eval_every > 0
            && state.step % config.run.eval_every == 0
            && state.step != total
            && !eval.is_empty()
        {
            let report = needle::score(&compute_copy(&model), &eval, &tokenizer, device)?;
            let line = format!(
                "step {}: held-out needle accuracy {:.1}%",
                state.step,
                100.0 * report.accuracy()
            );
            if bar.is_hidden() {
                log(&line);
            } else {
                bar.println(line);
            }
            Some(report.accuracy())
        } else {
            None
        };
        let rss = rss_mib();
        let device_mib = device_mib(device);
        if let Some(mib) = device_mib {
            peak_device_mib = Some(peak_device_mib.map_or(mib, |p| p.max(mib)));
        }
        let line = Metrics {
            step: state.step,
            loss: loss_value,
            lr,
            grad_norm,
            tokens: step_tokens,
            tokens_per_s,
            step_s,
            elapsed_s: state.elapsed_s,
            rss_mib: rss,
            device_mib,
            model_tflops,
            mfu,
            needle_accuracy,
        };
        if let Some((metrics, events)) = sinks.as_mut() {
            writeln!(
                metrics,
                "{}",
                serde_json::to_string(&line).expect("metrics serialise")
            )
            .map_err(TrainError::io(&metrics_path))?;
            let wall = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            let step_i = state.step as i64;
            events.scalar("train/loss", step_i, loss_value, wall)?;
            events.scalar("train/lr", step_i, lr as f32, wall)?;
            events.scalar("train/grad_norm", step_i, grad_norm, wall)?;
            events.scalar("train/tokens_per_s", step_i, tokens_per_s as f32, wall)?;
            if let Some(accuracy) = needle_accuracy {
                events.scalar("eval/needle_accuracy", step_i, accuracy as f32, wall)?;
            }
        }
        bar.set_message(format!(
            "loss {loss_value:.4} lr {lr:.2e} |g| {grad_norm:.2} {tokens_per_s:.0} tok/s {}{}",
            match mfu {
                Some(m) => format!("MFU {:.1}%", 100.0 * m),
                None => format!("{model_tflops:.3} TFLOP/s"),
            },
            match device_mib {
                Some(m) => format!(" device {:.1} GiB", m / 1024.0),
                None => rss.map_or(String::new(), |m| format!(" rss {:.0} MiB", m)),
            }
        ));
        bar.set_position(state.step as u64);

        if let Some((metrics, events)) = sinks.as_mut()
            && (state.step % config.run.checkpoint_every == 0 || state.step == last)
        {
            metrics.flush().map_err(TrainError::io(&metrics_path))?;
            events.flush()?;
            let dir = checkpoint::save(
                out,
                &model,
                &vlm_config,
                &optim,
                &state,
                &tokenizer_json,
                config.run.keep_checkpoints,
            )?;
            last_checkpoint = Some(dir);
        }
    }
    bar.finish_and_clear();
    let eval_report = if writes && state.step == total && !eval.is_empty() {
        Some(needle::score(
            &compute_copy(&model),
            &eval,
            &tokenizer,
            device,
        )?)
    } else {
        None
    };
    if let (Some(report), Some((_, events))) = (&eval_report, sinks.as_mut()) {
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        events.scalar(
            "eval/needle_accuracy",
            state.step as i64,
            report.accuracy() as f32,
            wall,
        )?;
        let path = out.join("needle.json");
        std::fs::write(
            &path,
            serde_json::to_string_pretty(report).expect("report serialises"),
        )
        .map_err(TrainError::io(&path))?;
    }
    if let Some((_, events)) = sinks.as_mut() {
        events.flush()?;
    }
    let run_s = timer.elapsed().as_secs_f64();
    Ok(TrainSummary {
        losses: state.losses.clone(),
        first_step,
        last_step: state.step,
        tokens_per_s: tokens_this_run as f64 / run_s.max(1e-9),
        model_tflops: flops_this_run / run_s.max(1e-9) / 1e12,
        elapsed_s: run_s,
        checkpoint: last_checkpoint,
        eval: eval_report,
        data: data_description,
        params,
        trainable_params,
        peak_device_mib,
        attention,
    })
}
