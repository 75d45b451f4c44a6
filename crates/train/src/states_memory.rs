//! The model states a run still has to allocate once its weights are loaded, checked
//! against the memory available before the first step: a run whose gradients,
//! optimizer moments and 16-bit working copy cannot fit is refused with the numbers
//! and what would make it fit, instead of running out of memory inside a step.
//!
//! Per trained parameter: an f32 gradient (4 bytes; with 16-bit compute the 16-bit
//! gradient is cast to f32 for the master update) and AdamW's two f32 moments (8
//! bytes, divided by the ranks with `run.shard_optimizer`); with 16-bit compute, every
//! parameter's working copy (2 bytes). Activations are not counted, so a run that
//! passes may still need more: the check only refuses what cannot fit at all. The
//! one activation checked is the tensor-op reference attention's score matrix (before
//! every step on one device, [`check_reference_attention`]): quadratic in the
//! sequence, it is what kills long CPU runs.

use burn::tensor::Device;

use crate::error::TrainError;
use crate::zero::ShardId;

/// The parameters of a run's model and how its states are kept.
#[derive(Debug, Clone, Copy)]
pub struct StatesPlan {
    pub trained: usize,
    pub frozen: usize,
    /// 16-bit compute with f32 master weights (a working copy per step).
    pub master: bool,
    /// The moments' shard, when sharded.
    pub shard: Option<ShardId>,
}

const GIB: f64 = (1u64 << 30) as f64;

impl StatesPlan {
    /// Bytes still to allocate: gradients, moments (this rank's share) and the
    /// working copy.
    pub fn bytes_to_allocate(&self) -> f64 {
        let ranks = self.shard.map_or(1, |s| s.world) as f64;
        let trained = self.trained as f64;
        let copy = if self.master {
            2.0 * (self.trained + self.frozen) as f64
        } else {
            0.0
        };
        trained * 4.0 + trained * 8.0 / ranks + copy
    }

    /// Refuses the plan when its states exceed `available` bytes, naming the parts and
    /// what would make them fit.
    pub fn check(&self, available: f64) -> Result<(), TrainError> {
        let need = self.bytes_to_allocate();
        if need <= available {
            return Ok(());
        }
        let trained = self.trained as f64;
        let ranks = self.shard.map_or(1, |s| s.world);
        let moments = trained * 8.0 / ranks as f64;
        let copy = need - trained * 4.0 - moments;
        let sharded = match self.shard {
            Some(s) => format!(" (sharded over {} ranks)", s.world),
            None => String::new(),
        };
        // The fewest ranks whose share of the moments would let the rest fit.
        let room = available - trained * 4.0 - copy;
        let advice = if room > 0.0 {
            let ranks = (trained * 8.0 / room).ceil().max(2.0);
            format!(
                "shard the moments over at least {ranks:.0} ranks (run.shard_optimizer = true \
                 with --parallel), or train fewer parameters"
            )
        } else {
            "the gradients and working copy alone exceed it: train fewer parameters (a LoRA \
             stage, a smaller model) or use a device with more memory"
                .to_string()
        };
        Err(TrainError::Request(format!(
            "the model states do not fit: {:.2}M trained parameters need {:.1} GiB more \
             ({:.1} GiB of f32 gradients, {:.1} GiB of AdamW moments{sharded}, {:.1} GiB of \
             16-bit working copy) but {:.1} GiB is available on the device, before any \
             activation; {advice}",
            trained / 1e6,
            need / GIB,
            trained * 4.0 / GIB,
            moments / GIB,
            copy / GIB,
            available / GIB,
        )))
    }
}

/// [`StatesPlan::check`] against `budget` bytes, or else what the device has
/// available now (`longview_infer::prefill::available_bytes`); no check where
/// nothing knows.
pub fn check_states(
    plan: &StatesPlan,
    budget: Option<f64>,
    device: &Device,
) -> Result<(), TrainError> {
    match longview_infer::prefill::available_bytes(budget, device) {
        Some(available) => plan.check(available),
        None => Ok(()),
    }
}

/// Refuses a micro-batch whose tensor-op reference attention cannot fit even one
/// layer's score matrices: `[batch, heads, longest, longest]` f32 scores and their
/// softmax, 8 bytes a (query, key) pair a head. A lower bound (every other
/// activation comes on top; without recomputation every layer keeps its softmax
/// for the backward), so a run refused here would be killed inside its first step.
pub fn check_reference_attention(
    (batch, heads, longest): (usize, usize, usize),
    available: f64,
) -> Result<(), String> {
    let need = 8.0 * batch as f64 * heads as f64 * (longest as f64).powi(2);
    if need <= available {
        return Ok(());
    }
    Err(format!(
        "a micro-batch of {batch} samples of up to {longest} tokens needs {:.1} GiB for one \
         layer's attention scores with the tensor-op reference attention ([{batch}, {heads}, \
         {longest}, {longest}] f32 scores and softmax) but {:.1} GiB is available: use fewer \
         frames (data.frames) or a smaller run.batch_size, or a GPU, whose flash kernels \
         keep no score matrix (--device cuda)",
        need / GIB,
        available / GIB
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_attention_scores_past_the_memory_are_refused() {
        // 2 x 12 x 50,000^2 x 8 bytes = 447 GiB.
        let shape = (2, 12, 50_000);
        let need = 8.0 * 2.0 * 12.0 * 50_000f64.powi(2);
        check_reference_attention(shape, need).unwrap();
        let err = check_reference_attention(shape, need - 1.0).unwrap_err();
        assert!(
            err.contains("447.0 GiB") && err.contains("data.frames"),
            "{err}"
        );
    }

    #[test]
    fn the_estimate_counts_gradients_moments_and_the_working_copy() {
        let plan = StatesPlan {
            trained: 1000,
            frozen: 500,
            master: true,
            shard: None,
        };
        // 1000 x (4 + 8) + 1500 x 2.
        assert_eq!(plan.bytes_to_allocate(), 15_000.0);
        let sharded = StatesPlan {
            shard: Some(ShardId { rank: 1, world: 4 }),
            ..plan
        };
        // 1000 x (4 + 2) + 1500 x 2.
        assert_eq!(sharded.bytes_to_allocate(), 9_000.0);
        let f32_compute = StatesPlan {
            master: false,
            ..plan
        };
        assert_eq!(f32_compute.bytes_to_allocate(), 12_000.0);
    }

    #[test]
    fn a_plan_that_cannot_fit_is_refused_with_the_ranks_that_would_fit_it() {
        // The 7B VLM (8058 M parameters, all trained) in bf16 on an 80 GiB card with
        // its f32 weights loaded (30 GiB): 105 GiB more would be needed.
        let plan = StatesPlan {
            trained: 8_058_000_000,
            frozen: 0,
            master: true,
            shard: None,
        };
        let err = plan.check(50.0 * GIB).unwrap_err().to_string();
        assert!(err.contains("need 105.1 GiB more"), "{err}");
        assert!(err.contains("60.0 GiB of AdamW moments"), "{err}");
        // 50 - 30.0 (gradients) - 15.0 (copy) = 5.0 GiB for 60.0 GiB of moments.
        assert!(err.contains("at least 13 ranks"), "{err}");
        // Sharded over 16 ranks it fits.
        let sharded = StatesPlan {
            shard: Some(ShardId { rank: 0, world: 16 }),
            ..plan
        };
        sharded.check(50.0 * GIB).unwrap();
        // Gradients and copy alone over the limit: no sharding helps.
        let err = plan.check(40.0 * GIB).unwrap_err().to_string();
        assert!(err.contains("alone exceed it"), "{err}");
    }
}
