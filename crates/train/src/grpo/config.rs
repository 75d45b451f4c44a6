//! The `[grpo]` section of a run config (`model.stage = "grpo"`): rollouts, the
//! loss and its variants. Defaults are LongVILA-R1's (`docs/algorithms.md` section 9)
//! where they make sense at every size; the debug configs shrink lengths.

use serde::{Deserialize, Serialize};

use super::loss::{Aggregation, LossSettings};
use super::reward::ThinkAnswerReward;

/// Which GRPO variant the loss is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LossVariant {
    /// LongVILA-R1 / EasyR1: advantages divided by the group's std, token-mean
    /// aggregation.
    #[default]
    Grpo,
    /// Dr. GRPO: advantages not divided by the std, each sequence's token losses
    /// summed and divided by `max_response_tokens`.
    DrGrpo,
}

impl LossVariant {
    pub fn normalize_std(self) -> bool {
        self == LossVariant::Grpo
    }

    pub fn aggregation(self) -> Aggregation {
        match self {
            LossVariant::Grpo => Aggregation::TokenMean,
            LossVariant::DrGrpo => Aggregation::SeqSumNorm,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpoConfig {
    /// Responses sampled per prompt (G).
    pub group_size: usize,
    /// Sampling temperature of the rollouts; every log-prob pass divides the logits
    /// by it too.
    pub temperature: f64,
    /// Nucleus of the rollouts.
    pub top_p: f64,
    /// Longest response; longer ones are cut (and get no format reward).
    pub max_response_tokens: usize,
    /// Optimizer steps per rollout batch (`run.batch_size` prompts): the groups are
    /// split into this many mini-batches, one AdamW step each.
    pub minibatches: usize,
    pub clip_low: f64,
    pub clip_high: f64,
    /// For negative advantages the loss is capped at `dual_clip * |A|` (0: off).
    pub dual_clip: f64,
    /// Weight of the k3 KL to the frozen reference (the `model.init_from` weights).
    pub kl_coef: f64,
    pub loss: LossVariant,
    /// DAPO's dynamic sampling, simplified: groups whose rewards are all equal (no
    /// learning signal) are dropped from the update and counted.
    pub drop_equal_groups: bool,
    /// Weight of accuracy in the reward (the rest is the format reward).
    pub accuracy_weight: f32,
    /// Re-encode the video in every pass instead of reusing the rollout's visual
    /// tokens (what MR-SP's embedding cache saves; for benchmarks).
    pub reencode_video: bool,
    /// Prompt rows per prefill chunk in the rollouts (0: one pass).
    pub prefill_chunk: usize,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        GrpoConfig {
            group_size: 5,
            temperature: 1.0,
            top_p: 0.99,
            max_response_tokens: 2048,
            minibatches: 1,
            clip_low: 0.2,
            clip_high: 0.3,
            dual_clip: 3.0,
            kl_coef: 0.01,
            loss: LossVariant::Grpo,
            drop_equal_groups: false,
            accuracy_weight: 0.9,
            reencode_video: false,
            prefill_chunk: longview_infer::prefill::DEFAULT_CHUNK,
        }
    }
}

impl GrpoConfig {
    /// LongVILA-R1's reward with this config's accuracy weight.
    pub fn reward(&self) -> ThinkAnswerReward {
        ThinkAnswerReward {
            accuracy_weight: self.accuracy_weight,
        }
    }

    pub fn settings(&self) -> LossSettings {
        LossSettings {
            clip_low: self.clip_low,
            clip_high: self.clip_high,
            dual_clip: self.dual_clip,
            kl_coef: self.kl_coef,
        }
    }

    /// The first bad value as `(key, message)`.
    pub fn check(&self, prompts_per_step: usize) -> Result<(), (String, String)> {
        let bad = |key: &str, message: String| Err((format!("grpo.{key}"), message));
        if self.group_size < 2 {
            return bad(
                "group_size",
                format!(
                    "{} must be at least 2 (advantages compare a group)",
                    self.group_size
                ),
            );
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return bad(
                "temperature",
                format!("{} must be positive", self.temperature),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", format!("{} must be in (0, 1]", self.top_p));
        }
        if self.max_response_tokens == 0 {
            return bad("max_response_tokens", "must be at least 1".into());
        }
        if self.minibatches == 0 || !prompts_per_step.is_multiple_of(self.minibatches) {
            return bad(
                "minibatches",
                format!(
                    "{} must divide run.batch_size ({prompts_per_step} prompts a step) so \
                     that every rollout batch takes that many optimizer steps",
                    self.minibatches
                ),
            );
        }
        if !(0.0..1.0).contains(&self.clip_low) || self.clip_high.is_nan() || self.clip_high < 0.0 {
            return bad(
                "clip_low",
                format!(
                    "clip_low {} must be in [0, 1) and clip_high {} >= 0",
                    self.clip_low, self.clip_high
                ),
            );
        }
        if !(self.dual_clip == 0.0 || self.dual_clip > 1.0) {
            return bad(
                "dual_clip",
                format!("{} must be 0 (off) or above 1", self.dual_clip),
            );
        }
        if !(self.kl_coef >= 0.0 && self.kl_coef.is_finite()) {
            return bad("kl_coef", format!("{} must be >= 0", self.kl_coef));
        }
        if !(0.0..=1.0).contains(&self.accuracy_weight) {
            return bad(
                "accuracy_weight",
                format!("{} must be in [0, 1]", self.accuracy_weight),
            );
        }
        Ok(())
    }
}
