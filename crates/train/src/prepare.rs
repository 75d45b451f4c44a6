//! Run preparation: a fresh model (random or `model.init_from`) or the newest
//! checkpoint of a resumed run, frozen and cast as the stage asks, with the attention
//! plan applied (the data and its worker are `crate::data_feed`).

use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::ModuleOptimizer;
use burn::tensor::{DType, Device, Tensor};
use longview_data::TextTokenizer;
use longview_models::hf::checkpoint::load_vila;
use longview_models::{Vlm, VlmConfig};

use crate::checkpoint::{self, FORMAT_VERSION, TrainerState};
use crate::config::{Part, TrainConfig};
use crate::error::TrainError;
use crate::grads::{cast_params, count_params, optimizer};
use crate::plan::AttentionPlan;
use crate::run_lock::RunLock;
use crate::states_memory::{StatesPlan, check_states};
use crate::trainer::{StepRunner, TrainOptions};

/// Everything a run needs before its first step.
pub(crate) struct Prepared {
    /// The trained copy: f32 master weights under 16-bit compute.
    pub model: Vlm,
    pub vlm_config: VlmConfig,
    pub optim: ModuleOptimizer,
    pub state: TrainerState,
    pub tokenizer: TextTokenizer,
    pub tokenizer_json: String,
    pub plan: AttentionPlan,
    /// The compute dtype, and whether an f32 master copy is kept beside it.
    pub compute: DType,
    pub master: bool,
    /// The run folder's lock (the writing rank), released when the run ends.
    pub _lock: Option<RunLock>,
}

impl Prepared {
    /// The model in the compute dtype (what steps and evaluation run on).
    pub fn compute_copy(&self, model: &Vlm) -> Vlm {
        if self.master {
            cast_params(model.clone(), self.compute)
        } else {
            model.clone()
        }
    }

    /// A compute-dtype copy of the model for scoring on this rank alone (held-out
    /// evaluation on the writer), without autodiff (a forward pass on an autodiff
    /// model keeps its graph and activations alive) and with the one-device kind of
    /// LLM attention, since a sequence-parallel run's `Sharded` layers would need the
    /// other ranks. Its tensors belong on the training device's inner device.
    pub fn scoring_copy(&self) -> Vlm {
        self.plan.one_device(self.compute_copy(&self.model)).valid()
    }
}

/// Checks the run folder against `options.resume`, then builds or loads the model,
/// optimizer and trainer state.
pub(crate) fn prepare(
    config: &TrainConfig,
    options: &TrainOptions,
    device: &Device,
    log: &mut dyn FnMut(&str),
    runner: &dyn StepRunner,
) -> Result<Prepared, TrainError> {
    config.validate("(in memory)")?;
    let out = &config.run.out;
    std::fs::create_dir_all(out).map_err(TrainError::io(out))?;
    let lock = match runner.writes() {
        true => Some(RunLock::acquire(out)?),
        false => None,
    };
    if runner.writes() {
        for name in checkpoint::clean_partial(out)? {
            log(&format!(
                "removed the unfinished checkpoint {name} of an interrupted run"
            ));
        }
    }
    let latest = match &options.resume_from {
        Some(dir) => Some(chosen_checkpoint(dir)?),
        None => checkpoint::latest(out)?,
    };
    let compute: DType = device.settings().float_dtype.into();
    let master = matches!(compute, DType::BF16 | DType::F16);
    let resume = options.resume || options.resume_from.is_some();
    check_resume(&latest, resume, master, compute, out)?;

    let tokenizer = tokenizer(config)?;
    let tokenizer_json = tokenizer
        .inner()
        .to_string(false)
        .map_err(|e| TrainError::Config {
            source_name: tokenizer.source().into(),
            message: format!("cannot serialise the tokenizer: {e}"),
        })?;
    let (model, vlm_config, optim, state) = match &latest {
        Some(dir) => {
            let shard = runner.optimizer_shard();
            // A layout other than the one written is refused before anything loads
            // (the checkpoint is fine, so no older one is suggested).
            crate::zero::shard_files(dir, shard)?;
            let loaded = checkpoint::load(dir, optimizer(&config.optim), shard, device).map_err(|e| {
                match checkpoint::previous(out, dir) {
                    Some(before) => TrainError::checkpoint(
                        dir,
                        format!(
                            "cannot be resumed from: {e}. The checkpoint before it may be intact: --resume {}",
                            before.display()
                        ),
                    ),
                    None => e,
                }
            })?;
            if loaded.state.seed != config.run.seed {
                return Err(TrainError::checkpoint(
                    dir,
                    format!(
                        "was written with run.seed {} but the config says {}: the data order would differ",
                        loaded.state.seed, config.run.seed
                    ),
                ));
            }
            if loaded.state.step > config.run.steps {
                return Err(TrainError::checkpoint(
                    dir,
                    format!(
                        "is at step {} but run.steps is {}: a resumed run cannot end before \
                         its checkpoint; set run.steps (or --steps) to {} or more",
                        loaded.state.step, config.run.steps, loaded.state.step
                    ),
                ));
            }
            let changed = config_changes(&loaded.state.config, config);
            if !changed.is_empty() {
                if !options.allow_config_change {
                    return Err(TrainError::checkpoint(
                        dir,
                        format!(
                            "was written with another config: {}. Resuming would not continue the same run; restore those values, or pass --allow-config-change to resume with the new ones",
                            changed.join(", ")
                        ),
                    ));
                }
                log(&format!(
                    "resuming with a changed config: {}",
                    changed.join(", ")
                ));
            }
            log(&format!(
                "resuming from {} (step {})",
                dir.display(),
                loaded.state.step
            ));
            // A checkpoint from before the limit was saved gets it from the tokenizer.
            let (mut model, mut vlm_config) = (loaded.model, loaded.config);
            longview_infer::load::limit_generation(&mut model, &mut vlm_config, &tokenizer);
            (model, vlm_config, loaded.optimizer, loaded.state)
        }
        None => {
            let (model, vlm_config) = fresh_model(config, &tokenizer, device, log)?;
            let state = TrainerState {
                format_version: FORMAT_VERSION,
                step: 0,
                samples_seen: 0,
                tokens_seen: 0,
                seed: config.run.seed,
                losses: Vec::new(),
                elapsed_s: 0.0,
                config: config.to_toml(),
                skipped: 0,
            };
            (model, vlm_config, optimizer(&config.optim), state)
        }
    };
    let plan = AttentionPlan::resolve(
        config.run.attention,
        device,
        runner.sequence_parallel(device),
    )?;
    log(&format!("attention: {plan}"));
    let model = plan.apply(model);
    match runner.optimizer_shard() {
        Some(shard) => log(&format!(
            "optimizer: AdamW moments sharded over {} ranks (this rank keeps shard {})",
            shard.world, shard.rank
        )),
        None if config.run.shard_optimizer => {
            log("optimizer: run.shard_optimizer has no effect on one device")
        }
        None => {}
    }
    let mut model = freeze(runner.sync_model(model)?, &config.trainable());
    // 16-bit compute keeps f32 master weights: the optimizer updates (and checkpoints
    // save) the f32 copy; every step runs on a bf16/f16 copy with the same ids.
    if master {
        model = cast_params(model, DType::F32);
        log(&format!(
            "precision: {compute:?} compute, f32 master weights and optimizer state"
        ));
    }
    let (all, trained) = count_params(&model);
    let states = StatesPlan {
        trained,
        frozen: all - trained,
        master,
        shard: runner.optimizer_shard(),
    };
    check_states(&states, options.memory_budget, device)?;
    Ok(Prepared {
        model,
        vlm_config,
        optim,
        state,
        tokenizer,
        tokenizer_json,
        plan,
        compute,
        master,
        _lock: lock,
    })
}

/// What differs between the config a checkpoint was written with (`saved`, TOML)
/// and `now` in the keys that change the run's course: the model, data, optimizer
/// and GRPO sections and the batch shape (`run.steps`, `run.out`, checkpointing and
/// evaluation cadence, attention and recomputation may change). `key: saved -> now`.
fn config_changes(saved: &str, now: &TrainConfig) -> Vec<String> {
    let Ok(saved) = toml::from_str::<TrainConfig>(saved) else {
        // A config this build cannot read is not compared (older checkpoints).
        return Vec::new();
    };
    let flat = |c: &TrainConfig| {
        let mut out = std::collections::BTreeMap::new();
        if let Ok(serde_json::Value::Object(sections)) = serde_json::to_value(c) {
            for (section, value) in sections {
                if let serde_json::Value::Object(keys) = value {
                    for (key, v) in keys {
                        out.insert(format!("{section}.{key}"), v);
                    }
                }
            }
        }
        out
    };
    let guarded = |key: &str| {
        let section = key.split('.').next().unwrap_or("");
        match section {
            "model" | "optim" | "grpo" => true,
            "data" => key != "data.cache",
            "run" => matches!(key, "run.batch_size" | "run.grad_accum"),
            _ => false,
        }
    };
    let (before, after) = (flat(&saved), flat(now));
    after
        .iter()
        .filter(|(key, value)| guarded(key) && before.get(*key) != Some(*value))
        .map(|(key, value)| {
            let was = before
                .get(key)
                .map_or("(unset)".to_string(), |v| v.to_string());
            format!("{key}: {was} -> {value}")
        })
        .collect()
}

/// A checkpoint folder named by `--resume PATH`: complete (its trainer state is
/// there), or an error naming what is wrong.
fn chosen_checkpoint(dir: &Path) -> Result<PathBuf, TrainError> {
    if !dir.join("trainer.json").is_file() || !dir.join("model").is_dir() {
        return Err(TrainError::checkpoint(
            dir,
            "is not a complete checkpoint folder (it needs trainer.json and model/; pass a \
             checkpoints/step-NNNNNN folder, or --resume without a path for the newest)",
        ));
    }
    Ok(dir.to_path_buf())
}

/// Refuses a fresh start over existing checkpoints, a resume without one, and (for
/// now) resuming a 16-bit run.
fn check_resume(
    latest: &Option<PathBuf>,
    resume: bool,
    master: bool,
    compute: DType,
    out: &Path,
) -> Result<(), TrainError> {
    if master && resume && latest.is_some() {
        // Burn 0.22 reloads AdamW's moments in the device's default float dtype, which
        // then meet the f32 master's gradients (a dtype panic inside Burn).
        return Err(TrainError::Request(format!(
            "resuming a {compute:?} run (f32 master weights) is not supported yet: Burn 0.22 \
             reloads the optimizer state in {compute:?}; resume with --dtype f32 (the \
             checkpoint holds f32 weights and optimizer state) or start a fresh run"
        )));
    }
    match (latest, resume) {
        (Some(dir), false) => Err(TrainError::Checkpoint {
            path: dir.clone(),
            message: "the run folder already has checkpoints: pass --resume to continue it, \
                      or choose another run.out / --out"
                .into(),
        }),
        (None, true) => Err(TrainError::Checkpoint {
            path: checkpoint::root(out),
            message: "--resume given but there is no complete checkpoint to resume from".into(),
        }),
        _ => Ok(()),
    }
}

/// The model a fresh run starts from: `model.init_from`, or the named size drawn from
/// `run.seed`; with the config's RoPE base and LoRA adapters.
fn fresh_model(
    config: &TrainConfig,
    tokenizer: &TextTokenizer,
    device: &Device,
    log: &mut dyn FnMut(&str),
) -> Result<(Vlm, VlmConfig), TrainError> {
    let (mut model, mut vlm_config) = match init_dir(config)? {
        Some(dir) => {
            let (mut model, mut vlm) = load_vila(&dir, device)?;
            log(&format!(
                "initialised from {}: LLM {} layers x {} hidden, vision {} layers (model.size \
                 is not used)",
                dir.display(),
                vlm.text.num_layers,
                vlm.text.hidden_size,
                vlm.vision.num_layers
            ));
            longview_infer::load::check_vocabulary(&dir, tokenizer, &vlm)?;
            longview_infer::load::limit_generation(&mut model, &mut vlm, tokenizer);
            (model, vlm)
        }
        None => {
            let vlm_config = model_config(config, tokenizer)?;
            (
                draw_initial(&vlm_config, config.run.seed, device),
                vlm_config,
            )
        }
    };
    if let Some(side) = config.model.token_pool {
        let grid = vlm_config.vision.grid_side();
        let (a, b) = vlm_config.projector.kind.token_grid(grid, grid);
        if side == 0 || side > a.min(b) {
            return Err(TrainError::Config {
                source_name: "model".into(),
                message: format!(
                    "`model.token_pool`: {side} must be in 1..={} (the projector's {a}x{b} token grid)",
                    a.min(b)
                ),
            });
        }
        log(&format!(
            "token budget: {} visual tokens a frame ({side}x{side} pooled)",
            side * side
        ));
        vlm_config.projector.token_pool = Some(side);
        model.mm_projector.token_pool = Some(side);
    }
    if let Some(k) = config.model.temporal_pool {
        if !(1..=1024).contains(&k) {
            return Err(TrainError::Config {
                source_name: "model".into(),
                message: format!("`model.temporal_pool`: {k} must be in 1..=1024 frames"),
            });
        }
        log(&format!(
            "token budget over time: every {k} consecutive frames of a video averaged into one"
        ));
        vlm_config.projector.temporal_pool = Some(k);
        model.mm_projector.temporal_pool = Some(k);
    }
    if let Some(theta) = config.model.rope_theta {
        log(&format!(
            "RoPE base {} -> {theta}",
            vlm_config.text.rope_theta
        ));
        vlm_config.text.rope_theta = theta;
        model.llm.rope_theta = theta;
    }
    if config.trainable().contains(&Part::LlmLora) {
        model.llm = model.llm.with_lora(
            config.model.lora_rank,
            config.model.lora_alpha,
            config.run.seed,
            device,
        );
    }
    Ok((model, vlm_config))
}

/// Random initial weights that depend on the seed alone. Burn's device RNG is
/// process-wide and a parameter is drawn lazily, when first used: ranks initialising
/// on several threads would interleave their draws, and the draw order would follow
/// the first forward pass. Under one process-wide lock the RNG is seeded, the model
/// built and every parameter drawn at once, in the module's order, so every layout and
/// every rerun starts from the same weights.
fn draw_initial(vlm: &VlmConfig, seed: u64, device: &Device) -> Vlm {
    struct Draw;
    impl ModuleVisitor for Draw {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let _ = param.val();
        }
    }
    static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = INIT.lock().unwrap_or_else(|p| p.into_inner());
    device.seed(seed);
    let model = vlm.init(device);
    model.visit(&mut Draw);
    model
}

/// The tokenizer of a run: the `init_from` checkpoint's, else the embedded debug one.
pub fn tokenizer(config: &TrainConfig) -> Result<TextTokenizer, TrainError> {
    match init_dir(config)? {
        Some(dir) => Ok(TextTokenizer::from_checkpoint_dir(&dir)?),
        None => Ok(TextTokenizer::debug()),
    }
}

/// The VILA model folder `model.init_from` names: itself, a checkpoint's `model/`, or
/// a run folder's newest checkpoint (so a stage can start from the previous stage's
/// run folder).
pub fn init_dir(config: &TrainConfig) -> Result<Option<PathBuf>, TrainError> {
    match &config.model.init_from {
        Some(path) => Ok(Some(longview_infer::load::resolve_model_dir(path)?)),
        None => Ok(None),
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
    // A larger shape keeps its vocabulary; the rows past the tokenizer's are never
    // generated (their ids could not be decoded into text for the rewards).
    if tokenizer.vocab_size() < vlm.text.vocab_size {
        vlm.generation_vocab = Some(tokenizer.vocab_size());
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

/// Freezes what the stage does not train.
fn freeze(model: Vlm, trainable: &[Part]) -> Vlm {
    let Vlm {
        mut vision_tower,
        mut mm_projector,
        mut llm,
        vision_feature,
        placeholder_token_id,
        generation_vocab,
    } = model;
    if !trainable.contains(&Part::Vision) {
        vision_tower = vision_tower.no_grad();
    }
    if !trainable.contains(&Part::Projector) {
        mm_projector = mm_projector.no_grad();
    }
    if trainable.contains(&Part::LlmLora) {
        llm = llm.lora_trainable();
    } else if !trainable.contains(&Part::Llm) {
        llm = llm.no_grad();
    }
    Vlm {
        vision_tower,
        mm_projector,
        llm,
        vision_feature,
        placeholder_token_id,
        generation_vocab,
    }
}
