//! The GRPO objective as LongVILA-R1 trains it (`docs/algorithms.md` section 9):
//! group-normalised advantages, the PPO clipped ratio with separate low/high clips
//! and a dual clip for negative advantages, and a KL penalty to a frozen reference
//! with the low-variance k3 estimator. All per token over the response tokens; the
//! caller sums over its micro-batches and divides by the step's denominator
//! ([`Aggregation`]).

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

/// How per-token losses become the step's loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Aggregation {
    /// The mean over every response token of the optimizer step (all its sequences
    /// together): long responses weigh more. (The peer code takes the token mean
    /// per micro-batch and divides by the accumulation steps; with one micro-batch
    /// per step the two agree.)
    #[default]
    TokenMean,
    /// Dr. GRPO: each sequence's token losses summed and divided by the maximum
    /// response length (a constant), then the mean over the step's sequences: no
    /// length bias.
    SeqSumNorm,
}

/// The clip and KL settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossSettings {
    /// The ratio is clipped to `[1 - clip_low, 1 + clip_high]`.
    pub clip_low: f64,
    pub clip_high: f64,
    /// For negative advantages the loss is at most `dual_clip * |A|` (0: off).
    pub dual_clip: f64,
    /// Weight of the k3 KL to the reference (0: no reference pass).
    pub kl_coef: f64,
}

/// Group advantages: `(r - mean) / (std + 1e-6)` with the unbiased std, or with
/// `normalize_std = false` (Dr. GRPO) just `r - mean`. A group of one has
/// advantage 0.
pub fn group_advantages(rewards: &[f32], normalize_std: bool) -> Vec<f32> {
    let n = rewards.len();
    if n < 2 {
        return vec![0.0; n];
    }
    let mean = rewards.iter().map(|&r| r as f64).sum::<f64>() / n as f64;
    let var = rewards
        .iter()
        .map(|&r| (r as f64 - mean).powi(2))
        .sum::<f64>()
        / (n - 1) as f64;
    let scale = if normalize_std {
        1.0 / (var.sqrt() + 1e-6)
    } else {
        1.0
    };
    rewards
        .iter()
        .map(|&r| ((r as f64 - mean) * scale) as f32)
        .collect()
}

/// Per-token losses and what they are made of, before aggregation.
pub struct TokenLosses {
    /// `[sequences, tokens]`: policy loss plus `kl_coef * kl`, tracked.
    pub loss: Tensor<2>,
    /// `[sequences, tokens]`, 1 where the ratio's clipped branch set the loss.
    pub clipped: Tensor<2>,
    /// `[sequences, tokens]`, the k3 KL estimate (zeros without a reference).
    pub kl: Tensor<2>,
}

/// The per-token GRPO loss.
///
/// - `logp`: the actor's log-probs of the response tokens (tracked), `old`: the
///   same before this rollout batch's updates, `reference`: the frozen reference's
///   (or `None` when `kl_coef` is 0); all `[sequences, tokens]`, at the sampling
///   temperature.
/// - `advantages`: `[sequences]`, broadcast over the tokens.
///
/// Policy term: `L1 = -A * ratio`, `L2 = -A * clip(ratio)`, `L = max(L1, L2)`, and
/// for `A < 0` with a dual clip `min(L, -dual_clip * A)`; `ratio = exp(clamp(logp -
/// old, -20, 20))`. KL term (k3): `d = clamp(ref - logp, -20, 20)`, `kl =
/// clamp(exp(d) - d - 1, -10, 10)`.
pub fn token_losses(
    logp: Tensor<2>,
    old: Tensor<2>,
    reference: Option<Tensor<2>>,
    advantages: Tensor<1>,
    settings: &LossSettings,
) -> TokenLosses {
    let [n, t] = logp.dims();
    let neg_adv = advantages.neg().unsqueeze_dim::<2>(1).expand([n, t]);
    let ratio = (logp.clone() - old).clamp(-20.0, 20.0).exp();
    let l1 = neg_adv.clone() * ratio.clone();
    let bounded = ratio.clamp(1.0 - settings.clip_low, 1.0 + settings.clip_high);
    let l2 = neg_adv.clone() * bounded;
    let clipped = l2.clone().greater(l1.clone()).float();
    let mut policy = l1.max_pair(l2);
    if settings.dual_clip > 0.0 {
        let cap = neg_adv.clone().mul_scalar(settings.dual_clip);
        let negative = neg_adv.greater_elem(0.0);
        policy = policy.clone().mask_where(negative, policy.min_pair(cap));
    }
    let kl = match reference {
        Some(reference) if settings.kl_coef > 0.0 => {
            let d = (reference - logp).clamp(-20.0, 20.0);
            (d.clone().exp() - d).sub_scalar(1.0).clamp(-10.0, 10.0)
        }
        _ => policy.zeros_like(),
    };
    TokenLosses {
        loss: policy + kl.clone().mul_scalar(settings.kl_coef),
        clipped,
        kl,
    }
}

/// The sum of `values` over the tokens where `mask` is 1 (`[sequences, tokens]`).
pub fn masked_sum(values: Tensor<2>, mask: Tensor<2>) -> Tensor<1> {
    (values * mask).sum()
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, TensorData};

    use super::*;

    fn t2(rows: &[&[f32]], device: &Device) -> Tensor<2> {
        let (n, t) = (rows.len(), rows[0].len());
        let data: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_data(TensorData::new(data, [n, t]), device)
    }

    fn host(t: Tensor<2>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
    }

    const SETTINGS: LossSettings = LossSettings {
        clip_low: 0.2,
        clip_high: 0.3,
        dual_clip: 3.0,
        kl_coef: 0.0,
    };

    #[test]
    fn advantages_are_group_normalised_with_the_unbiased_std() {
        // mean 0.5, unbiased std sqrt(1/3) = 0.57735.
        let a = group_advantages(&[1.0, 0.0, 1.0, 0.0], true);
        for (got, want) in a.iter().zip([0.866025, -0.866025, 0.866025, -0.866025]) {
            assert!((got - want).abs() < 1e-5, "{a:?}");
        }
        assert_eq!(group_advantages(&[1.0, 0.0], false), vec![0.5, -0.5]);
        assert_eq!(group_advantages(&[0.3, 0.3, 0.3], true), vec![0.0; 3]);
        assert_eq!(group_advantages(&[0.7], true), vec![0.0]);
    }

    #[test]
    fn clipped_ratio_and_dual_clip_match_hand_values() {
        let device = Device::flex();
        // Ratios exp(ln r): 1.5 (clipped high to 1.3), 0.5 (clipped low to 0.8),
        // 1.1 (inside), 5.0 (dual clip for A < 0).
        let ln = |r: f32| r.ln();
        let logp = t2(&[&[ln(1.5), ln(0.5)], &[ln(1.1), ln(5.0)]], &device);
        let old = logp.zeros_like();
        let cases = [
            // A = +1: L = max(-r, -clip(r)).
            (1.0, [-1.3, -0.5, -1.1, -1.3], [1.0, 0.0, 0.0, 1.0]),
            // A = -1: L = max(r, clip(r)), then min(L, 3).
            (-1.0, [1.5, 0.8, 1.1, 3.0], [0.0, 1.0, 0.0, 0.0]),
        ];
        for (a, want, clipped) in cases {
            let adv = Tensor::<1>::from_data(TensorData::new(vec![a, a], [2]), &device);
            let out = token_losses(logp.clone(), old.clone(), None, adv, &SETTINGS);
            for (got, want) in host(out.loss).iter().zip(want) {
                assert!((got - want).abs() < 1e-5, "A={a}: {got} vs {want}");
            }
            assert_eq!(host(out.clipped), clipped.to_vec(), "A={a}");
        }
    }

    #[test]
    fn k3_kl_matches_hand_values_and_is_clamped() {
        let device = Device::flex();
        let logp = t2(&[&[-1.0, -2.0, -30.0]], &device);
        let reference = t2(&[&[-1.0, -1.5, -0.5]], &device);
        let adv = Tensor::<1>::from_data(TensorData::new(vec![0.0f32], [1]), &device);
        let settings = LossSettings {
            kl_coef: 0.01,
            ..SETTINGS
        };
        let out = token_losses(logp.clone(), logp, Some(reference), adv, &settings);
        // d = 0 -> 0; d = 0.5 -> e^0.5 - 1.5 = 0.148721; d = 29.5 -> clamp(20) then
        // e^20 - 21 -> clamped to 10.
        let kl = host(out.kl);
        for (got, want) in kl.iter().zip([0.0, 0.148721, 10.0]) {
            assert!((got - want).abs() < 1e-5, "{kl:?}");
        }
        // A = 0: the loss is the KL term alone.
        for (got, want) in host(out.loss).iter().zip([0.0, 0.00148721, 0.1]) {
            assert!((got - want).abs() < 1e-6, "loss {got} vs {want}");
        }
    }

    #[test]
    fn masked_sum_ignores_padding() {
        let device = Device::flex();
        let values = t2(&[&[1.0, 2.0, 100.0], &[3.0, 100.0, 100.0]], &device);
        let mask = t2(&[&[1.0, 1.0, 0.0], &[1.0, 0.0, 0.0]], &device);
        let sum = masked_sum(values, mask)
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap()[0];
        assert_eq!(sum, 6.0);
    }
}
