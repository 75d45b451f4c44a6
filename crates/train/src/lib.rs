//! longview's training and evaluation.
//!
//! - [`config`]: the TOML run config (stages, optimizer, data), checked up front.
//! - [`data`]: generated haystack and needle videos decoded with FFmpeg, needles
//!   inserted into haystacks for training, the chat template, and batching.
//! - [`trainer`]: the loop (accumulation, global-norm clipping, AdamW, warmup +
//!   cosine), metrics, progress, and resume; [`adamw`]: its AdamW (Burn's, or one fused
//!   kernel a parameter on CUDA unless `LONGVIEW_FUSED_ADAMW=0`).
//! - [`tensorboard`]: scalar event files TensorBoard reads.
//! - [`checkpoint`]: atomic checkpoints in VILA layout plus optimizer and trainer state.
//! - [`needle`]: LongVILA's teacher-forced needle scoring; [`eval`]: the depth x
//!   length grid of a saved model, as a table, JSON and heatmap, multiple choice and
//!   open-ended answers.
//! - [`generate`]: KV-cache generation, greedy or top-p.
//! - [`remat`]: the step executor over the model's stages, with activation
//!   checkpointing per layer or LightSeq's attention-aware one; [`mmsp`] supplies its
//!   MM-SP hooks.
//! - [`plan`]: the attention plan a run resolves once.
//! - [`zero`]: the AdamW moments sharded over a run's ranks (`run.shard_optimizer`).
//! - [`grpo`]: LongVILA-R1's GRPO stage (rollouts over cached visual tokens, rewards,
//!   the clipped objective with a KL to the reference).

pub mod adamw;
pub mod checkpoint;
pub mod config;
pub mod data;
mod data_feed;
pub mod error;
pub mod eval;
pub mod eval_progress;
pub mod grad_sync;
pub mod grads;
pub mod grpo;
pub mod heatmap;
pub mod long_text;
/// KV-cache generation (from `longview-infer`).
pub use longview_infer::generate;
/// Teacher-forced needle scoring (from `longview-infer`).
pub use longview_infer::needle;
pub mod mmsp;
pub mod phases;
pub mod plan;
mod prepare;
pub mod remat;
pub mod run_lock;
mod run_loop;
mod sinks;
pub mod skips;
pub mod states_memory;
pub mod tensorboard;
pub mod trainer;
pub mod zero;

pub use config::{
    AnswerFormat, DataConfig, ModelConfig, OptimConfig, Part, RunConfig, Stage, TrainConfig,
};
pub use error::TrainError;
pub use needle::NeedleReport;
pub use trainer::{SteadyRate, TrainOptions, TrainSummary, learning_rate, train};
