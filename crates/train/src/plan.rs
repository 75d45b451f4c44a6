//! The attention plan of a run: which attention the vision encoder and the LLM call,
//! which kernel computes it, and the sequence-parallel scheme, resolved once at the
//! start from `run.attention`, the device (and its float dtype), this build's
//! features and the layout. It is applied to the model once
//! ([`AttentionPlan::apply`]), printed in the run's log and summary, and written into
//! the first row `metrics.jsonl` gets from each invocation.

use std::fmt;

use burn::tensor::{DType, Device};
use longview_models::Vlm;
use longview_models::attention::{AttentionImpl, flash_available};
use serde::Serialize;

use crate::config::AttentionChoice;
use crate::error::TrainError;

/// What every attention of a run calls.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionPlan {
    /// The vision encoder's (full, per-frame) attention: `Reference` or `Flash`.
    pub vision: AttentionImpl,
    /// The LLM layers': `Reference`, `Flash`, or `Sharded` (the sequence-parallel
    /// scheme of [`AttentionPlan::sequence_parallel`], installed on each rank's thread).
    pub text: AttentionImpl,
    /// Which flash kernels run where a part calls `Flash`.
    pub flash_kernel: Option<&'static str>,
    /// The scheme, its group size and what computes its blocks, when `text` is `Sharded`.
    pub sequence_parallel: Option<String>,
}

impl AttentionPlan {
    /// Resolves `choice` on `device`; `sequence_parallel` describes the layout's scheme
    /// (from [`crate::trainer::StepRunner::sequence_parallel`]) when the LLM's tokens are
    /// sharded across ranks.
    pub fn resolve(
        choice: AttentionChoice,
        device: &Device,
        sequence_parallel: Option<String>,
    ) -> Result<AttentionPlan, TrainError> {
        let base = match choice {
            AttentionChoice::Reference => AttentionImpl::Reference,
            AttentionChoice::Auto if flash_available(device) => AttentionImpl::Flash,
            AttentionChoice::Auto => AttentionImpl::Reference,
            AttentionChoice::Flash if flash_available(device) => AttentionImpl::Flash,
            AttentionChoice::Flash => {
                return Err(TrainError::Config {
                    source_name: "run.attention".into(),
                    message: format!(
                        "`flash` needs a CUDA device and a build with the `cuda` feature (this \
                         run is on {device:?}); use `auto` or `reference`"
                    ),
                });
            }
        };
        let text = match sequence_parallel {
            Some(_) => AttentionImpl::Sharded,
            None => base,
        };
        let flash_kernel = (base == AttentionImpl::Flash).then(|| {
            let dtype: DType = device.settings().float_dtype.into();
            match dtype {
                // The kernels fall back to the scalar ones where the GPU has no
                // mma.sync (before sm_80) or the head dim does not fit.
                DType::BF16 | DType::F16 => "tensor-core (mma.sync) kernels where the GPU has them",
                _ => "scalar kernels (f32)",
            }
        });
        Ok(AttentionPlan {
            vision: base,
            text,
            flash_kernel,
            sequence_parallel,
        })
    }

    /// The model with the plan's attention in every layer.
    pub fn apply(&self, model: Vlm) -> Vlm {
        model.with_attention(self.vision, self.text)
    }

    /// The model with one device's attention in every layer (`Reference` or
    /// `Flash`, as the vision encoder's), for work one rank does alone.
    pub fn one_device(&self, model: Vlm) -> Vlm {
        model.with_attention(self.vision, self.vision)
    }

    /// The plan as it goes into `metrics.jsonl`.
    pub fn record(&self) -> PlanRecord {
        PlanRecord {
            vision: name(self.vision),
            text: name(self.text),
            flash_kernel: self.flash_kernel,
            sequence_parallel: self.sequence_parallel.clone(),
            summary: self.to_string(),
        }
    }
}

/// [`AttentionPlan`] in serialisable form.
#[derive(Debug, Clone, Serialize)]
pub struct PlanRecord {
    pub vision: &'static str,
    pub text: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flash_kernel: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sequence_parallel: Option<String>,
    pub summary: String,
}

fn name(attention: AttentionImpl) -> &'static str {
    match attention {
        AttentionImpl::Reference => "reference",
        AttentionImpl::Flash => "flash",
        AttentionImpl::Sharded => "sharded",
    }
}

impl fmt::Display for AttentionPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let part = |attention: AttentionImpl| match attention {
            AttentionImpl::Reference => "tensor-op reference".to_string(),
            AttentionImpl::Flash => format!(
                "flash, {}",
                self.flash_kernel.unwrap_or("kernels of this build")
            ),
            AttentionImpl::Sharded => self
                .sequence_parallel
                .clone()
                .unwrap_or_else(|| "sequence-parallel scheme".into()),
        };
        write!(
            f,
            "vision encoder: {}; LLM: {}",
            part(self.vision),
            part(self.text)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_auto_is_the_reference_and_flash_is_refused_with_the_key() {
        let device = Device::flex();
        let plan = AttentionPlan::resolve(AttentionChoice::Auto, &device, None).unwrap();
        assert_eq!(
            (plan.vision, plan.text),
            (AttentionImpl::Reference, AttentionImpl::Reference)
        );
        assert_eq!(plan.flash_kernel, None);
        let sp = AttentionPlan::resolve(
            AttentionChoice::Reference,
            &device,
            Some("zigzag ring over 2 ranks".into()),
        )
        .unwrap();
        assert_eq!(
            (sp.vision, sp.text),
            (AttentionImpl::Reference, AttentionImpl::Sharded)
        );
        assert!(
            sp.to_string().contains("LLM: zigzag ring over 2 ranks"),
            "{sp}"
        );
        let err = AttentionPlan::resolve(AttentionChoice::Flash, &device, None).unwrap_err();
        assert!(err.to_string().contains("run.attention"), "{err}");
    }
}
