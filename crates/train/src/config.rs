//! Run configuration: one TOML file per run (`configs/*.toml`), every field with a
//! default, unknown keys refused, and every value checked before any work starts.

use std::path::{Path, PathBuf};

use longview_parallel::inference::SpScheme;
use serde::{Deserialize, Serialize};

use crate::error::TrainError;
use crate::remat::Recompute;

/// A whole run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub run: RunConfig,
    pub model: ModelConfig,
    pub optim: OptimConfig,
    pub data: DataConfig,
    /// Rollouts and loss of `model.stage = "grpo"` (ignored by the other stages).
    pub grpo: crate::grpo::config::GrpoConfig,
}

/// Length, batch and bookkeeping of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Folder of checkpoints, metrics and the resolved config.
    pub out: PathBuf,
    /// Seed of the initial weights and the data order.
    pub seed: u64,
    /// Optimizer steps.
    pub steps: usize,
    /// Samples in one micro-batch.
    pub batch_size: usize,
    /// Micro-batches summed into one optimizer step.
    pub grad_accum: usize,
    /// Write a checkpoint every this many steps (and always after the last one).
    pub checkpoint_every: usize,
    /// Checkpoints kept on disk (oldest deleted first); at least 1.
    pub keep_checkpoints: usize,
    /// Score the held-out needle set every this many steps (0: only at the end).
    pub eval_every: usize,
    /// Activation recomputation (one device or MM-SP): `none`, `layers` or
    /// `attention-aware` (LightSeq: layer inputs and attention outputs kept, the
    /// attention forward never recomputed). See [`crate::remat`].
    pub recompute: Recompute,
    /// Attention of the vision encoder and the LLM: `auto` (longview's flash kernels
    /// where this build and device run them, i.e. CUDA; the tensor-op reference
    /// elsewhere), `reference` or `flash` (an error where it cannot run).
    pub attention: AttentionChoice,
    /// Under `--parallel`, shard AdamW's moments over the ranks (ZeRO stage 1 of the
    /// moments, [`crate::zero`]): each rank keeps and updates the moments of its share
    /// of the parameters, the updated weights are broadcast. Resuming needs the same
    /// number of ranks. No effect on one device.
    pub shard_optimizer: bool,
    /// The LLM's sequence-parallel attention under `--parallel DPxSP` with SP > 1
    /// (MM-SP training and GRPO's rollouts and log-prob passes): `ring` (zigzag ring,
    /// the default), `ulysses` (SP must suit the query and key/value heads) or `2d:U`
    /// (LongVILA's 2D attention: Ulysses inside groups of U ranks, zigzag ring across
    /// them). Checked against the heads when the ranks start.
    #[serde(with = "sp_scheme_text")]
    pub sp_scheme: SpScheme,
}

/// `run.sp_scheme` as the text `ring`, `ulysses` or `2d:U`.
mod sp_scheme_text {
    use longview_parallel::inference::SpScheme;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(scheme: &SpScheme, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&scheme.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SpScheme, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Which attention implementation a run's model calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttentionChoice {
    #[default]
    Auto,
    Reference,
    Flash,
}

/// Which LongVILA stage a run is; decides what trains unless `trainable` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// (1) Only the projector trains.
    ProjectorAlignment,
    /// (2) Projector and LLM train; the vision encoder stays frozen.
    Pretrain,
    /// (3) Short-video supervised fine-tuning, all weights.
    ShortSft,
    /// (4) LLM context extension on long text (LoRA on q/k/v/o, embeddings, norms).
    ContextExtension,
    /// (5) Long-video supervised fine-tuning, all weights.
    LongVideoSft,
    /// LongVILA-R1's chain-of-thought SFT, all weights.
    CotSft,
    /// LongVILA-R1's reinforcement learning (GRPO, `[grpo]`): the LLM trains on
    /// cached visual tokens, the vision tower and projector stay frozen.
    Grpo,
}

/// A part of the VLM that can train or stay frozen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Part {
    Vision,
    Projector,
    Llm,
    /// LoRA adapters on the LLM's q/k/v/o projections plus its embeddings and norms;
    /// the rest of the LLM stays frozen (stage 4).
    LlmLora,
}

impl Stage {
    /// The parts LongVILA trains in this stage.
    pub fn default_trainable(self) -> Vec<Part> {
        match self {
            Stage::ProjectorAlignment => vec![Part::Projector],
            Stage::Pretrain => vec![Part::Projector, Part::Llm],
            Stage::ContextExtension => vec![Part::LlmLora],
            Stage::Grpo => vec![Part::Llm],
            Stage::ShortSft | Stage::LongVideoSft | Stage::CotSft => {
                vec![Part::Vision, Part::Projector, Part::Llm]
            }
        }
    }
}

/// The model to train.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Named shape for random initialisation: `debug`, `small`, `1.5b` or `7b`. The
    /// debug and small models' vocabulary follows the embedded debug tokenizer.
    pub size: String,
    /// Start from this VILA-layout checkpoint folder instead of random weights.
    pub init_from: Option<PathBuf>,
    pub stage: Stage,
    /// Overrides the stage's trainable parts.
    pub trainable: Option<Vec<Part>>,
    /// LoRA rank and alpha (scale `alpha / rank`) when `llm-lora` trains.
    pub lora_rank: usize,
    pub lora_alpha: f64,
    /// New RoPE base of the LLM (stage 4 raises it to extend the context); written
    /// into the saved config.
    pub rope_theta: Option<f64>,
    /// Token budget for long videos: each frame's visual tokens average-pooled to a
    /// `token_pool x token_pool` grid after the projector (e.g. 8: 64 tokens a frame
    /// instead of 196); saved with the checkpoint.
    pub token_pool: Option<usize>,
    /// Token budget over time: the visual tokens of every `temporal_pool`
    /// consecutive frames of a video averaged into one frame's worth (LongVILA-R1's
    /// later code pools 8; a video's last group is filled with copies of its last
    /// frame); saved with the checkpoint.
    pub temporal_pool: Option<usize>,
}

/// AdamW, the learning-rate schedule and clipping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warmup from 0 to `lr` over this many steps.
    pub warmup_steps: usize,
    /// Cosine decay from `lr` to `lr * min_lr_ratio` at the last step.
    pub min_lr_ratio: f64,
    /// Decoupled (AdamW) decay of weight matrices, embeddings and convolution kernels;
    /// biases and normalisation parameters are never decayed.
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Scale all gradients together so their global L2 norm is at most this (0: off).
    pub clip_grad_norm: f64,
}

/// Where samples come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataKind {
    /// Generated needle-in-a-haystack videos (two-digit numbers on one frame).
    Haystack,
    /// LLaVA/VILA conversation rows (`data.path`): `conversations` with `<image>` /
    /// `<video>` markers, `image` / `video` paths relative to the file.
    Conversations,
    /// LongVILA-R1's LongVideo-Reason rows (`data.path`) for chain-of-thought SFT:
    /// `videos`, `problem`, `answer` with `<think>...</think><answer>...</answer>`.
    Cot,
    /// Long text (`data.path`, rows `{"text": ...}`) for stage 4: documents joined
    /// with `<|endoftext|>` and cut into `data.max_tokens`-token windows, every token
    /// supervised. Without `data.path`: generated pass-key documents.
    Text,
}

/// How the generated needle samples' answers are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AnswerFormat {
    /// The number alone (`42`).
    #[default]
    Plain,
    /// LongVILA-R1's shape: `<think>...</think><answer>42</answer>` (CoT-SFT and GRPO
    /// on the synthetic task).
    Think,
}

/// The training and held-out data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    pub kind: DataKind,
    /// Where generated videos are cached (default: `<out>/data`).
    pub cache: Option<PathBuf>,
    /// The JSONL file of `conversations` and `cot` data (relative paths resolve
    /// against the working directory; media paths inside against the file's folder).
    pub path: Option<PathBuf>,
    /// Frames of the longest training videos and of the held-out videos (every frame
    /// is fed to the model); for JSONL data, frames sampled uniformly from each video.
    pub frames: usize,
    /// Training haystacks come in lengths `min_frames`, doubling, up to `frames`, in equal
    /// shares: short haystacks teach reading the needle, long ones finding it.
    pub min_frames: usize,
    /// Needle frames per two-digit number in the training needle bank (each copy on
    /// another background); training samples insert one into a haystack at a random
    /// depth, a fresh combination every sample.
    pub needle_copies: usize,
    /// Held-out videos per depth of LongVILA's grid {0, .2, .4, .6, .8, 1}.
    pub eval_per_depth: usize,
    /// Tokens per training window of `text` data.
    pub max_tokens: usize,
    /// Video size in pixels (default: the vision encoder's input size).
    pub width: Option<u32>,
    pub height: Option<u32>,
    /// How generated needle answers are written (`haystack` data).
    pub answer_format: AnswerFormat,
    /// The longest sample (prompt and answer tokens) a run takes; longer ones are
    /// skipped like unusable ones. Default: the model's `max_position_embeddings`
    /// (32,768 for the named Qwen2 shapes). RoPE has no hard limit: set it for
    /// long-video runs past 32k tokens (LongVILA extends the context in stage 4 and
    /// trains 1024-frame videos), or shrink the samples (`model.token_pool`,
    /// `model.temporal_pool`, fewer `frames`).
    pub max_sample_tokens: Option<usize>,
    /// Unusable samples (undecodable media, rows longer than the model's context) are
    /// skipped and replaced (`skipped.jsonl`); the run stops when more than this share
    /// of the samples drawn had to be skipped.
    pub max_skipped_fraction: f64,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            out: PathBuf::from("runs/debug-haystack"),
            seed: 0,
            steps: 3000,
            batch_size: 4,
            grad_accum: 1,
            checkpoint_every: 500,
            keep_checkpoints: 2,
            eval_every: 0,
            recompute: Recompute::None,
            attention: AttentionChoice::Auto,
            shard_optimizer: false,
            sp_scheme: SpScheme::ZigzagRing,
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            size: "debug".into(),
            init_from: None,
            stage: Stage::LongVideoSft,
            trainable: None,
            lora_rank: 8,
            lora_alpha: 16.0,
            rope_theta: None,
            token_pool: None,
            temporal_pool: None,
        }
    }
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: 1e-3,
            warmup_steps: 20,
            min_lr_ratio: 0.1,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            clip_grad_norm: 1.0,
        }
    }
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            kind: DataKind::Haystack,
            cache: None,
            path: None,
            frames: 32,
            min_frames: 1,
            needle_copies: 8,
            eval_per_depth: 4,
            max_tokens: 4096,
            width: None,
            height: None,
            answer_format: AnswerFormat::Plain,
            max_sample_tokens: None,
            max_skipped_fraction: 0.01,
        }
    }
}

impl TrainConfig {
    /// Reads and checks a TOML file; errors name the file, the key and the value.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, TrainError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| TrainError::Io {
            path: path.into(),
            source,
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Parses and checks TOML text (`source` names it in errors).
    pub fn from_toml(text: &str, source: &str) -> Result<Self, TrainError> {
        let config: TrainConfig = toml::from_str(text).map_err(|e| TrainError::Config {
            source_name: source.into(),
            message: e.to_string(),
        })?;
        config.validate(source)?;
        Ok(config)
    }

    /// The config as TOML (what a run writes next to its checkpoints).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the config serialises")
    }

    /// Parts that train in this run.
    pub fn trainable(&self) -> Vec<Part> {
        self.model
            .trainable
            .clone()
            .unwrap_or_else(|| self.model.stage.default_trainable())
    }

    /// Checks every value; `source` names the file in the error.
    pub fn validate(&self, source: &str) -> Result<(), TrainError> {
        let bad = |key: &str, message: String| {
            Err(TrainError::Config {
                source_name: source.into(),
                message: format!("`{key}`: {message}"),
            })
        };
        let (r, o, d) = (&self.run, &self.optim, &self.data);
        if r.steps == 0 {
            return bad("run.steps", "must be at least 1".into());
        }
        if r.batch_size == 0 {
            return bad("run.batch_size", "must be at least 1".into());
        }
        if r.grad_accum == 0 {
            return bad("run.grad_accum", "must be at least 1".into());
        }
        if r.checkpoint_every == 0 {
            return bad("run.checkpoint_every", "must be at least 1".into());
        }
        if r.keep_checkpoints == 0 {
            return bad("run.keep_checkpoints", "must be at least 1".into());
        }
        if longview_models::VlmConfig::named(&self.model.size).is_none() {
            return bad(
                "model.size",
                format!("`{}` is not debug, small, 1.5b or 7b", self.model.size),
            );
        }
        let trainable = self.trainable();
        if trainable.contains(&Part::Llm) && trainable.contains(&Part::LlmLora) {
            return bad(
                "model.trainable",
                "names both `llm` (all LLM weights) and `llm-lora` (adapters on a frozen \
                 LLM): keep one"
                    .into(),
            );
        }
        if trainable.contains(&Part::LlmLora) && self.model.lora_rank == 0 {
            return bad("model.lora_rank", "must be at least 1".into());
        }
        if !(self.model.lora_alpha.is_finite() && self.model.lora_alpha > 0.0) {
            return bad(
                "model.lora_alpha",
                format!("{} must be positive", self.model.lora_alpha),
            );
        }
        if let Some(theta) = self.model.rope_theta
            && !(theta.is_finite() && theta > 1.0)
        {
            return bad("model.rope_theta", format!("{theta} must be above 1"));
        }
        if self.trainable().is_empty() {
            return bad(
                "model.trainable",
                "names no part: nothing would train".into(),
            );
        }
        if !(o.lr.is_finite() && o.lr > 0.0) {
            return bad("optim.lr", format!("{} must be positive", o.lr));
        }
        if !(0.0..=1.0).contains(&o.min_lr_ratio) {
            return bad(
                "optim.min_lr_ratio",
                format!("{} must be in [0, 1]", o.min_lr_ratio),
            );
        }
        if o.warmup_steps > r.steps {
            return bad(
                "optim.warmup_steps",
                format!("{} exceeds run.steps ({})", o.warmup_steps, r.steps),
            );
        }
        for (key, value) in [("optim.beta1", o.beta1), ("optim.beta2", o.beta2)] {
            if !(0.0..1.0).contains(&value) {
                return bad(key, format!("{value} must be in [0, 1)"));
            }
        }
        if o.eps.is_nan() || o.eps <= 0.0 {
            return bad("optim.eps", format!("{} must be positive", o.eps));
        }
        if o.weight_decay.is_nan() || o.weight_decay < 0.0 {
            return bad(
                "optim.weight_decay",
                format!("{} must be >= 0", o.weight_decay),
            );
        }
        if o.clip_grad_norm.is_nan() || o.clip_grad_norm < 0.0 {
            return bad(
                "optim.clip_grad_norm",
                format!("{} must be >= 0 (0 turns clipping off)", o.clip_grad_norm),
            );
        }
        if d.frames == 0 {
            return bad("data.frames", "must be at least 1".into());
        }
        if d.min_frames == 0 || d.min_frames > d.frames {
            return bad(
                "data.min_frames",
                format!("{} must be in 1..=data.frames ({})", d.min_frames, d.frames),
            );
        }
        match (d.kind, &d.path) {
            (DataKind::Haystack, Some(path)) => {
                return bad(
                    "data.path",
                    format!(
                        "{} is set but data.kind is `haystack` (generated); set data.kind to \
                         `conversations`, `cot` or `text` to train on a JSONL file",
                        path.display()
                    ),
                );
            }
            (DataKind::Conversations | DataKind::Cot, None) => {
                return bad(
                    "data.path",
                    "is required for data.kind `conversations` and `cot` (the JSONL file)".into(),
                );
            }
            _ => {}
        }
        if d.max_tokens < 2 {
            return bad(
                "data.max_tokens",
                format!("{} must be at least 2", d.max_tokens),
            );
        }
        if d.needle_copies == 0 {
            return bad("data.needle_copies", "must be at least 1".into());
        }
        if d.max_sample_tokens == Some(0) {
            return bad(
                "data.max_sample_tokens",
                "0: a sample has at least one token".into(),
            );
        }
        if !(0.0..=1.0).contains(&d.max_skipped_fraction) {
            return bad(
                "data.max_skipped_fraction",
                format!("{} must be in [0, 1]", d.max_skipped_fraction),
            );
        }
        if self.model.stage == Stage::Grpo {
            if let Err((key, message)) = self.grpo.check(r.batch_size) {
                return bad(&key, message);
            }
            if d.kind == DataKind::Text {
                return bad(
                    "data.kind",
                    "\"text\" has no question and answer to reward; GRPO takes \"haystack\", \
                     \"cot\" or \"conversations\" rows"
                        .into(),
                );
            }
            let trainable = self.trainable();
            let frozen_input = [Part::Vision, Part::Projector]
                .into_iter()
                .find(|part| trainable.contains(part));
            if let Some(part) = frozen_input
                && !self.grpo.reencode_video
            {
                return bad(
                    "model.trainable",
                    format!(
                        "\"{}\" is trainable, but GRPO's passes reuse the rollout's cached \
                         visual tokens, which carry no gradient to it; set \
                         grpo.reencode_video = true to train it, or leave it out",
                        if part == Part::Vision {
                            "vision"
                        } else {
                            "projector"
                        }
                    ),
                );
            }
        }
        for (key, value) in [("data.width", d.width), ("data.height", d.height)] {
            if let Some(v) = value
                && (v < 16 || v % 2 != 0)
            {
                return bad(key, format!("{v} must be even and at least 16"));
            }
        }
        Ok(())
    }
}
